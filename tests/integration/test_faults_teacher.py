"""Fault: kill -9 one of two teacher replicas in the middle of a run, then restart it on the same port.

Real processes on loopback: two `opd teacher serve` subprocesses (hf backend, tiny Llama), a real
redis-server, the real rollout HTTP service, and the real rollout worker scoring through one TeacherClient
over both replicas. The run must go on with the survivor (the client moves requests that found the dead
replica unavailable to the other one), every record written must be whole and none lost, and the restarted
replica must serve traffic again."""

from __future__ import annotations

import pytest
from opd_teacher_client import TeacherClient

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.redis_server import EmbeddedRedis, free_port
from services.rollout.app import build_app
from services.rollout.client import RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.server import running_server
from tests.integration.fault_procs import (
    Proc,
    metric,
    start_worker,
    stream_records,
    teacher_serving,
    wait_until,
    write_prompts,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

G, K = 2, 4
OK = 'code="OK"'


def _teacher(model, port: int, metrics_port: int, log_path) -> Proc:
    args = ["teacher", "serve", "--model", str(model), "--backend", "hf", "--device", "cpu"]
    args += ["--port", str(port), "--metrics-port", str(metrics_port), "--grace-s", "1"]
    return Proc(args, log_path)


def test_kill_9_one_teacher_replica_mid_run(tmp_path):
    tok = build_char_tokenizer()
    student = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=tok)
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1, tokenizer=tok)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    ports = [free_port(), free_port()]
    mports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    murls = [f"http://127.0.0.1:{p}" for p in mports]
    replicas = [_teacher(teacher, ports[i], mports[i], tmp_path / f"teacher{i}.log") for i in range(2)]
    worker = None
    try:
        for r in replicas:
            r.start()
        for r, a in zip(replicas, addresses, strict=True):
            wait_until(lambda a=a: teacher_serving(a), 180, f"teacher {a} serving", [r])
        with (
            EmbeddedRedis() as redis_server,
            running_server(
                build_app(RolloutConfig(model=str(student), port=0, insecure_no_token=True))
            ) as url,
            RolloutClient(url) as rollout,
            TeacherClient(addresses, timeout_s=30.0) as teacher_client,
        ):
            rollout.wait_ready(120)
            worker = start_worker(
                rollout,
                teacher_client,
                redis_url=redis_server.url,
                rollout_url=url,
                teacher=addresses,
                prompts=prompts,
                run="teacherfault",
                group_size=G,
                max_new_tokens=10,
                top_k=K,
                concurrency=3,
                retry_timeout_s=120.0,
            )
            thread, summary = worker.thread, worker.summary

            def written() -> int:
                assert thread.is_alive(), "the worker stopped"
                return len(worker.written)

            # Both replicas serve (the client spreads every record's sequences over both channels).
            wait_until(
                lambda: written() >= 4 and metric(murls[1], "opd_teacher_requests_total", OK) > 0,
                120,
                "records scored by both replicas",
            )
            replicas[1].kill9()  # requests may be in flight on it: they fail over to replica 0
            at_kill = written()
            survivor_before = metric(murls[0], "opd_teacher_requests_total", OK)
            wait_until(lambda: written() >= at_kill + 6, 180, "records after the kill", [replicas[0]])
            # Every record since the kill was scored by the survivor alone.
            assert metric(murls[0], "opd_teacher_requests_total", OK) >= survivor_before + 6

            # Restart on the same port: the client's channel reconnects and the replica gets traffic again.
            replicas[1].start()
            wait_until(lambda: teacher_serving(addresses[1]), 180, "restarted replica serving", [replicas[1]])
            at_restart = written()
            wait_until(
                lambda: (
                    metric(murls[1], "opd_teacher_requests_total", OK) >= 2 and written() >= at_restart + 3
                ),
                120,
                "restarted replica back in rotation",
                [replicas[1]],
            )
            worker.stop()
            thread.join(120)
            assert not thread.is_alive()

            # Nothing lost, nothing partial: the stream holds exactly the records written, each whole.
            assert summary["dropped"] == 0 and summary["bad_prompts"] == 0
            records = stream_records(redis_server.url, "teacherfault")
            assert len(records) == summary["records"] == len(worker.written)
            assert sorted(r.record_id for r in records) == sorted(rid for rid, _, _ in worker.written)
            for rec in records:
                assert len(rec.samples) == G
                for s in rec.samples:
                    n = len(s.completion_ids)
                    assert n >= 1 and s.behaviour_logprobs.shape == (n,)
                    assert s.teacher_topk_ids.shape == (n, K) and s.teacher_topk_logprobs.shape == (n, K)
                    assert s.teacher_target_logprobs.shape == (n,)
            # The failover happened inside the client: the worker never saw a failed Score call.
            assert worker.metrics.retries.labels("teacher_score")._value.get() == 0
    finally:
        if worker is not None:
            worker.shutdown(60)
        for r in replicas:
            r.cleanup()
