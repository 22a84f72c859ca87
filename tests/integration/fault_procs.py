"""Helpers of the fault tests (tests/integration/test_faults_*.py): real `opd` subprocesses that can be
killed with SIGKILL and restarted on the same port (`Proc`, from launcher/cli_proc.py), readiness
waits, Prometheus scraping, and a worker that remembers what it wrote. Not collected by pytest (no test_
prefix)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.cli_proc import CliProc as Proc
from services.common.experience import ExperienceRecord, decode
from services.common.redis_keys import RECORD_FIELD, connect, dead_letter_stream, experience_stream
from services.worker.config import WorkerConfig
from services.worker.loop import RolloutWorker
from tests.integration import stack

ARITH = [(f"{a}+{b}=", str(a + b)) for a, b in [(12, 34), (5, 7), (90, 9), (1, 1), (33, 44), (8, 8), (21, 3)]]


def write_prompts(path: Path) -> Path:
    return stack.write_prompts(path, ARITH)


def wait_until(cond, timeout: float, what: str, alive: list[Proc] = (), interval: float = 0.1) -> None:
    """Poll `cond()` until true; fail with `what` (and the log of a child that died) otherwise."""
    deadline = time.monotonic() + timeout
    while not cond():
        for p in alive:
            assert p.alive, f"{p.args[:2]} exited while waiting for {what}:\n{p.log()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def teacher_serving(address: str) -> bool:
    channel = grpc.insecure_channel(address)
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        return status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def http_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def metric(url: str, name: str, labels: str = "") -> float:
    """A Prometheus sample's value (0 when absent): `metric(url, "opd_teacher_requests_total", 'code="OK"')`."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def stream_records(redis_url: str, run: str) -> list[ExperienceRecord]:
    r = connect(redis_url)
    return [decode(fields[RECORD_FIELD]) for _, fields in r.xrange(experience_stream(run))]


def dead_letters(redis_url: str, run: str) -> list[dict[str, bytes]]:
    r = connect(redis_url)
    return [{k.decode(): v for k, v in fields.items()} for _, fields in r.xrange(dead_letter_stream(run))]


class RecordingWorker(RolloutWorker):
    """The real worker, remembering (record_id, policy_version, monotonic time) of every record it wrote;
    `start_thread()` runs it in a background thread whose summary lands in `summary`."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.written: list[tuple[str, int, float]] = []
        self.summary: dict = {}
        self.thread: threading.Thread | None = None

    def write(self, record: ExperienceRecord) -> str | None:
        entry = super().write(record)
        if entry is not None:
            with self._lock:
                self.written.append((record.record_id, record.policy_version, time.monotonic()))
        return entry

    def start_thread(self) -> RecordingWorker:
        self.thread = threading.Thread(target=lambda: self.summary.update(self.run()))
        self.thread.start()
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Graceful stop, then wait for the thread (a test's `finally`)."""
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout)


def start_worker(
    rollout, teacher_client, *, redis_url: str, rollout_url: str, teacher: list[str], prompts: Path, **kw
) -> RecordingWorker:
    """A RecordingWorker over these services (WorkerConfig fields in `kw`), running in its thread."""
    cfg = WorkerConfig(
        redis_url=redis_url, rollout_url=rollout_url, teacher=teacher, prompts=str(prompts), **kw
    )
    return RecordingWorker(cfg, rollout, teacher_client, connect(redis_url)).start_thread()


def trainer_proc(student, redis_url: str, rollout_url: str, ckpt_dir, log_path, **overrides) -> Proc:
    """`opd train` pushing to `rollout_url` after every batch, checkpointing every batch."""
    flags = dict(
        model=student,
        device="cpu",
        redis_url=redis_url,
        run="faults",
        batch_size=4,
        mini_batch_size=4,
        top_k=4,
        lr=1e-2,
        max_policy_lag=1000,
        read_block_ms=200,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=1,
        keep_checkpoints=1000,  # every version's weights stay on disk (the rollout test checks sha256s)
        push_every=1,
        rollout_urls=rollout_url,
        diagnostics_every=0,
    )
    flags.update(overrides)
    # Synchronous checkpoints: each version is committed before it is pushed, so a restarted rollout resumes
    # at the last pushed version (with background checkpoints it can resume one checkpoint behind and catch
    # up at the next push; docs/reliability.md).
    args = ["train", "--no-tensorboard", "--no-progress", "--no-checkpoint-async"]
    for k, v in flags.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return Proc(args, log_path)
