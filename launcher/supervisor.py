"""Child-process supervision for the local pipeline: start, wait healthy, watch, stop with no orphans.

Each child runs in its own process group with its output in `<log_dir>/<name>.log`. On a failure the
supervisor reports the first child that died, with the tail of its log, and stops all the others.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class ChildFailed(RuntimeError):
    """A supervised process exited unexpectedly or never became healthy."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Returns True once the child serves; None means "alive is enough".
    ready: Callable[[], bool] | None = None
    # A child whose exit with code 0 is the end of the run (the trainer).
    finishes_run: bool = False
    # A child that may exit with code 0 before the run ends (a worker with epochs or max_records).
    may_finish: bool = False
    proc: subprocess.Popen | None = None
    log_path: Path | None = None


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class Supervisor:
    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.env = env or {}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, child: Child) -> Child:
        child.log_path = self.log_dir / f"{child.name}.log"
        out = open(child.log_path, "ab")
        env = {**os.environ, **self.env, **child.env, "PYTHONUNBUFFERED": "1"}
        # start_new_session: the child leads its own process group, so stop() reaches its workers too.
        child.proc = subprocess.Popen(
            child.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        self.children.append(child)
        log.info("started %s (pid %d): %s", child.name, child.proc.pid, " ".join(child.argv))
        return child

    def wait_ready(self, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            if child.ready is None:
                return
            try:
                if child.ready():
                    log.info("%s is ready", child.name)
                    return
            except Exception:  # noqa: BLE001 - not ready yet, whatever the probe raised
                pass
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"{child.name} not ready after {timeout_s:.0f} s\n{log_tail(child.log_path)}"
                )
            time.sleep(0.5)

    def check(self) -> Child | None:
        """Raise ChildFailed if any child died; return a finishing child that exited cleanly."""
        for child in self.children:
            code = child.proc.poll() if child.proc else None
            if code is None:
                continue
            if code == 0 and child.finishes_run:
                return child
            if code == 0 and child.may_finish:
                continue
            raise ChildFailed(
                f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                f"{log_tail(child.log_path)}"
            )
        return None

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM every group (reverse start order), then SIGKILL what is left after the grace period."""
        for child in reversed(self.children):
            if child.proc and child.proc.poll() is None:
                _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            if not child.proc:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing", child.name, grace_s)
            # Kill the whole group either way: a service's own subprocesses (vLLM workers) must not outlive it.
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
