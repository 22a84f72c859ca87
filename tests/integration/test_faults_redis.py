"""Faults: restart Redis twice during a run (a clean SHUTDOWN via SIGTERM, then kill -9), and poison entries
(garbage bytes, a record of an unknown schema_version) in the middle of the stream.

Real processes on loopback: redis-server with AOF (`appendfsync always`: an acknowledged write is on disk,
so even the kill -9 may lose nothing; see docs/reliability.md for the everysec trade-off), `opd train` as a
subprocess pushing weights to the real rollout service after every batch, the real teacher and the real
rollout worker. Checked: the worker and the trainer reconnect and the run finishes; every record the worker
wrote is, exactly once, in a committed trained batch or a committed stale list (trained + stale ==
produced, no duplicates, nothing lost); the two poison entries are in `opd:<run>:dead` with their reasons."""

from __future__ import annotations

import time

import pytest
from opd_teacher_client import TeacherClient

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from opd.experience.v1 import experience_pb2
from services.common.experience import encode
from services.common.prompts import Prompt
from services.common.redis_keys import (
    CONSUMER_GROUP,
    RECORD_FIELD,
    connect,
    experience_stream,
    policy_version_key,
)
from services.common.redis_server import EmbeddedRedis, free_port
from services.rollout.app import build_app
from services.rollout.client import RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.server import running_server
from services.teacher.config import TeacherConfig
from services.teacher.server import run_server
from tests.integration.fault_procs import (
    ARITH,
    Proc,
    dead_letters,
    start_worker,
    trainer_proc,
    wait_until,
    write_prompts,
)
from trainer import checkpoint as ckpt

pytestmark = [pytest.mark.integration, pytest.mark.slow]

G, K, RUN, N_RECORDS = 2, 4, "redisfault", 30


def _restart(redis_server: EmbeddedRedis, kill: bool) -> None:
    redis_server.stop(kill=kill)
    time.sleep(1.5)  # both clients now see connection errors and back off
    redis_server.start()


def test_redis_restarts_and_poison_lose_nothing(tmp_path):
    tok = build_char_tokenizer()
    student = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=tok)
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1, tokenizer=tok)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    ckpt_dir = tmp_path / "ckpt"
    redis_server = EmbeddedRedis(
        port=free_port(), data_dir=tmp_path / "redis", appendonly=True, appendfsync="always"
    )
    trainer: Proc | None = None
    worker = None
    try:
        with (
            redis_server,
            run_server(TeacherConfig(model=str(teacher), backend="hf", port=0)) as teacher_handle,
            running_server(
                build_app(RolloutConfig(model=str(student), port=0, insecure_no_token=True))
            ) as url,
            RolloutClient(url) as rollout,
            TeacherClient([teacher_handle.address]) as teacher_client,
        ):
            rollout.wait_ready(120)
            # One record (G = 2 sequences) per batch, so that every record ends up in a committed batch;
            # max_policy_lag 1 makes some of them stale.
            trainer = trainer_proc(
                student,
                redis_server.url,
                url,
                ckpt_dir,
                tmp_path / "trainer.log",
                run=RUN,
                batch_size=G,
                mini_batch_size=G,
                max_policy_lag=1,
                keep_checkpoints=2,
            ).start()
            worker = start_worker(
                rollout,
                teacher_client,
                redis_url=redis_server.url,
                rollout_url=url,
                teacher=[teacher_handle.address],
                prompts=prompts,
                run=RUN,
                group_size=G,
                max_new_tokens=8,
                top_k=K,
                concurrency=2,
                max_backlog=6,
                max_records=N_RECORDS,
                retry_timeout_s=300.0,
            )
            thread, summary = worker.thread, worker.summary
            r = connect(redis_server.url)
            stream = experience_stream(RUN)

            def commits() -> int:
                return len(ckpt.read_commit_log(ckpt_dir))

            wait_until(lambda: len(worker.written) >= 6 and commits() >= 1, 240, "a first commit", [trainer])

            # Poison in the middle of the stream: garbage bytes, and a valid record of an unknown schema.
            real = worker.run_one(Prompt(row=0, text=ARITH[0][0], answer=ARITH[0][1]))  # not written
            wrong = experience_pb2.ExperienceGroup.FromString(encode(real))
            wrong.schema_version = 99
            poison = [r.xadd(stream, {RECORD_FIELD: b"\xff\x00garbage"}).decode()]
            poison.append(r.xadd(stream, {RECORD_FIELD: wrong.SerializeToString()}).decode())

            _restart(redis_server, kill=False)  # SIGTERM: Redis fsyncs the AOF and exits cleanly
            at = len(worker.written)
            wait_until(
                lambda: len(worker.written) >= at + 6, 240, "records after the clean restart", [trainer]
            )
            at_commits = commits()
            wait_until(lambda: commits() > at_commits, 240, "a commit after the clean restart", [trainer])

            _restart(redis_server, kill=True)  # SIGKILL: only what the AOF fsynced survives ("always")
            thread.join(300)
            assert not thread.is_alive(), "the worker did not finish"
            assert summary["records"] == N_RECORDS and summary["dropped"] == 0

            wait_until(lambda: r.xlen(stream) == 0, 240, "the trainer to drain the stream", [trainer])
            assert trainer.terminate(120) == 0, trainer.log()[-3000:]

            produced = [rid for rid, _, _ in worker.written]
            lines = ckpt.read_commit_log(ckpt_dir)
            trained = [rid for ln in lines for rid in ln["records"]]
            stale = [rid for ln in lines for rid in ln["stale_records"]]
            assert len(trained) + len(stale) == len(set(trained) | set(stale)), "a record was used twice"
            assert sorted(trained + stale) == sorted(produced), "a produced record was lost"
            assert len(set(produced)) == N_RECORDS
            assert r.xlen(stream) == 0 and r.xpending(stream, CONSUMER_GROUP)["pending"] == 0
            assert int(r.get(policy_version_key(RUN))) == lines[-1]["policy_version"] >= 3

            dead = {d["entry_id"].decode(): d["reason"].decode() for d in dead_letters(redis_server.url, RUN)}
            assert dead.keys() == set(poison)
            assert dead[poison[0]].startswith("ExperienceDecodeError")
            assert "schema_version 99" in dead[poison[1]]

            log = trainer.log()
            assert log.count("Redis unavailable") >= 1 and log.count("Redis is back") >= 1
            assert "Traceback" not in log
    finally:
        if worker is not None:
            worker.shutdown(60)
        if trainer is not None:
            trainer.cleanup()
        redis_server.close()
