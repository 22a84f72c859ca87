"""Fault: kill -9 the rollout service during a run (trainer pushing weights after every batch, worker
sampling), then restart it with `--resume-from <trainer checkpoint_dir>`.

Real processes on loopback: `opd rollout serve` and `opd train` as subprocesses, the teacher gRPC server,
a real redis-server and the real rollout worker. Checked: the worker waits and resumes; the trainer's push
waits out the restart; the restarted service answers nothing until it holds the trainer's newest committed
weights (version >= the last push, sha256 = that checkpoint's), so no generation is served from the
initial (stale) weights; records generated after the restart carry those versions; the run goes on."""

from __future__ import annotations

import time

import httpx
import pytest
from opd_teacher_client import TeacherClient

from experiments.diagnostics import load_full_state
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.common.policy_files import DCP_DIR, read_dcp_model
from services.common.redis_keys import connect, policy_version_key
from services.common.redis_server import EmbeddedRedis, free_port
from services.rollout.client import RolloutClient
from services.rollout.engine import state_sha256
from services.rollout.protocol import GenerateRequest
from services.teacher.config import TeacherConfig
from services.teacher.server import run_server
from tests.integration.fault_procs import (
    Proc,
    http_ready,
    start_worker,
    stream_records,
    trainer_proc,
    wait_until,
    write_prompts,
)
from trainer import checkpoint as ckpt

pytestmark = [pytest.mark.integration, pytest.mark.slow]

G, K, RUN = 2, 4, "rolloutfault"


def _sha_of_checkpoint(student, ckpt_dir, version: int) -> str:
    """sha256 of the weights the trainer checkpointed at `version` (push_every=1: batch == version)."""
    model = load_causal_lm(student)
    load_full_state(model, read_dcp_model(ckpt.checkpoint_path(ckpt_dir, version) / DCP_DIR))
    sd = model.state_dict()
    return state_sha256(sd, sd.keys())


def _worker(rollout, teacher_client, redis_url: str, url: str, teacher: str, prompts):
    """One worker thread, one prompt in flight, retrying the rollout for up to 300 s."""
    return start_worker(
        rollout,
        teacher_client,
        redis_url=redis_url,
        rollout_url=url,
        teacher=[teacher],
        prompts=prompts,
        run=RUN,
        group_size=G,
        max_new_tokens=8,
        top_k=K,
        concurrency=1,
        max_backlog=8,
        retry_timeout_s=300.0,
    )


def test_kill_9_rollout_restart_serves_current_weights(tmp_path):
    tok = build_char_tokenizer()
    student = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=tok)
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1, tokenizer=tok)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    ckpt_dir = tmp_path / "ckpt"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["rollout", "serve", "--model", str(student), "--device", "cpu", "--port", str(port)]
    serve += ["--insecure-no-token", "--resume-from", str(ckpt_dir), "--log-level", "warning"]
    rollout_proc = Proc(serve, tmp_path / "rollout.log")
    trainer = worker = None
    try:
        with (
            EmbeddedRedis() as redis_server,
            run_server(TeacherConfig(model=str(teacher), backend="hf", port=0)) as teacher_handle,
            TeacherClient([teacher_handle.address]) as teacher_client,
            RolloutClient(url, retries=1) as rollout,
        ):
            rollout_proc.start()
            wait_until(lambda: http_ready(url), 180, "rollout ready", [rollout_proc])
            assert rollout.weights().version == 0  # no checkpoint yet: the initial weights
            trainer = trainer_proc(
                student, redis_server.url, url, ckpt_dir, tmp_path / "trainer.log", run=RUN
            ).start()
            worker = _worker(rollout, teacher_client, redis_server.url, url, teacher_handle.address, prompts)
            thread = worker.thread
            r = connect(redis_server.url)

            def version() -> int:
                return int(r.get(policy_version_key(RUN)) or 0)

            wait_until(lambda: version() >= 3, 240, "three weight pushes", [trainer, rollout_proc])
            rollout_proc.kill9()
            v_kill = version()
            at_kill = len(worker.written)
            time.sleep(2.0)  # the worker and the trainer's push now hit a dead port
            assert trainer.alive and thread.is_alive()

            rollout_proc.start()
            # From the first byte it serves, the restarted service answers with the trainer's weights only:
            # before they are loaded every request is 503 (clients retry).
            served: list[int] = []
            deadline = time.monotonic() + 240
            while len(served) < 3:
                assert rollout_proc.alive, rollout_proc.log()[-3000:]
                assert time.monotonic() < deadline, "restarted rollout never served"
                try:
                    resp = httpx.post(
                        f"{url}/v1/generate",
                        json={"texts": ["1+1="], "n": 1, "max_new_tokens": 4, "seed": 1},
                        timeout=30,
                    )
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if resp.status_code == 503:
                    continue
                assert resp.status_code == 200, resp.text
                served.append(resp.json()["policy_version"])
            t_ready = time.monotonic()
            info = rollout.weights()
            assert min(served) >= v_kill >= 3, (served, v_kill)
            assert info.version >= served[0]
            assert info.sha256 == _sha_of_checkpoint(student, ckpt_dir, info.version)
            assert "resumed from" in rollout_proc.log()

            # The run goes on: more pushes land on the restarted service, and the worker writes records.
            wait_until(lambda: version() >= info.version + 2, 240, "pushes after the restart", [trainer])
            assert rollout.weights().version == version()
            wait_until(lambda: len(worker.written) >= at_kill + 4, 120, "records after the restart")
            worker.stop()
            thread.join(120)
            assert not thread.is_alive()
            assert trainer.terminate(120) == 0, trainer.log()[-3000:]

            # Records generated after the restart carry the resumed or later versions. With one prompt in
            # flight, at most one record (generated before the kill, scored after) can be older.
            after = [v for _, v, t in worker.written if t > t_ready]
            assert after and sum(v < served[0] for v in after) <= 1, (after, served)
            assert worker.totals["dropped"] == 0
            # Nothing lost: every record written was trained, dropped stale, or is still in the stream.
            lines = ckpt.read_commit_log(ckpt_dir)
            used = [rid for ln in lines for rid in ln["records"] + ln["stale_records"]]
            left = [rec.record_id for rec in stream_records(redis_server.url, RUN)]
            assert sorted(used + left) == sorted(rid for rid, _, _ in worker.written)
            assert worker.metrics.retries.labels("rollout_generate")._value.get() >= 1  # it did wait
            assert "Traceback" not in trainer.log()
    finally:
        if worker is not None:
            worker.shutdown(60)
        for p in (trainer, rollout_proc):
            if p is not None:
                p.cleanup()


def test_resume_from_shared_push_dir_and_checkpoint_dir(tmp_path):
    """`--resume-from` also reads a shared-mode push directory (policy-<N>.safetensors), taking the newest
    version over both layouts; /v1/weights is 503 until the weights are in, then reports them."""
    from services.rollout.app import build_app
    from services.rollout.client import state_dict_to_safetensors
    from services.rollout.config import RolloutConfig
    from services.rollout.server import running_server

    tok = build_char_tokenizer()
    student = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=tok)
    model = load_causal_lm(student)
    shared = tmp_path / "shared"
    shared.mkdir()
    for version, shift in ((4, 0.1), (7, 0.2)):  # a newer file wins
        for p in model.parameters():
            p.data.add_(shift)
        (shared / f"policy-{version:08d}.safetensors").write_bytes(
            state_dict_to_safetensors(model.state_dict())
        )
    sd = model.state_dict()
    want = state_sha256(sd, sd.keys())
    cfg = RolloutConfig(model=str(student), port=0, insecure_no_token=True, resume_from=str(shared))
    with running_server(build_app(cfg)) as url, RolloutClient(url) as client:
        client.wait_ready(120)
        info = client.weights()
        assert (info.version, info.sha256) == (7, want)
        out = client.generate(GenerateRequest(texts=["1+1="], n=1, max_new_tokens=3, seed=0))
        assert out.policy_version == 7
    # An empty directory: the initial weights at version 0.
    cfg = RolloutConfig(
        model=str(student), port=0, insecure_no_token=True, resume_from=str(tmp_path / "none")
    )
    with running_server(build_app(cfg)) as url, RolloutClient(url) as client:
        client.wait_ready(120)
        assert client.weights().version == 0


def test_a_rollout_restarted_without_resume_is_brought_current(tmp_path):
    """A rollout restarted without `--resume-from` (as the Kubernetes overlays ran it) serves version 0: every
    record it produces is stale. The trainer notices (a read that is all stale, and the rollout's reported
    version below its own), pushes its current weights again, and the run goes on training."""
    tok = build_char_tokenizer()
    student = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=tok)
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1, tokenizer=tok)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["rollout", "serve", "--model", str(student), "--device", "cpu", "--port", str(port)]
    rollout_proc = Proc([*serve, "--insecure-no-token", "--log-level", "warning"], tmp_path / "rollout.log")
    trainer = worker = None
    try:
        with (
            EmbeddedRedis() as redis_server,
            run_server(TeacherConfig(model=str(teacher), backend="hf", port=0)) as teacher_handle,
            TeacherClient([teacher_handle.address]) as teacher_client,
            RolloutClient(url, retries=1) as rollout,
        ):
            rollout_proc.start()
            wait_until(lambda: http_ready(url), 180, "rollout ready", [rollout_proc])
            trainer = trainer_proc(
                student,
                redis_server.url,
                url,
                tmp_path / "ckpt",
                tmp_path / "trainer.log",
                run=RUN,
                max_policy_lag=1,
            ).start()
            worker = _worker(rollout, teacher_client, redis_server.url, url, teacher_handle.address, prompts)
            r = connect(redis_server.url)

            def version() -> int:
                return int(r.get(policy_version_key(RUN)) or 0)

            wait_until(lambda: version() >= 3, 240, "three weight pushes", [trainer, rollout_proc])
            # Drain: no fresh record left to make a batch (whose push would bring the rollout current anyway)
            worker.stop()
            worker.thread.join(120)
            seen = [version(), time.monotonic()]

            def settled() -> bool:
                if version() != seen[0]:
                    seen[:] = [version(), time.monotonic()]
                return time.monotonic() - seen[1] > 3.0

            wait_until(settled, 120, "the trainer to use up the fresh records", [trainer])
            rollout_proc.kill9()
            v_kill = version()
            rollout_proc.start()  # no --resume-from: the initial weights at version 0
            wait_until(lambda: http_ready(url), 180, "rollout ready again", [rollout_proc])
            assert rollout.weights().version == 0
            worker.shutdown(60)
            worker = start_worker(  # every record it writes now is stale until the trainer re-pushes
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
                concurrency=1,
                max_backlog=8,
                retry_timeout_s=300.0,
            )
            # brought current by the trainer, then trained on: the version keeps rising
            wait_until(lambda: rollout.weights().version >= v_kill, 240, "re-push", [trainer, rollout_proc])
            wait_until(lambda: version() >= v_kill + 2, 240, "training after the restart", [trainer])
            assert rollout.weights().version == version()
            assert "pushing the current weights again" in trainer.log()
            worker.stop()
            worker.thread.join(120)
            assert trainer.terminate(120) == 0, trainer.log()[-3000:]
            assert "Traceback" not in trainer.log()
    finally:
        if worker is not None:
            worker.shutdown(60)
        for p in (trainer, rollout_proc):
            if p is not None:
                p.cleanup()
