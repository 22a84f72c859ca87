"""One `python -m launcher.cli ...` child process, as the fault tests and the soak benchmark run the
services: this checkout first on PYTHONPATH, one OpenMP thread, output appended to a log file (a restarted
child keeps its earlier output), Python's faulthandler on (SIGABRT dumps every thread's stack into the log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout holding launcher/


class CliProc:
    """`python -m launcher.cli *args`, started (and restartable) with `start()`."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args, self.log_path, self.env = args, log_path, env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> CliProc:
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'proto'}",
            "OMP_NUM_THREADS": "1",
            "OPD_LOG_LEVEL": "INFO",
            "PYTHONFAULTHANDLER": "1",
            **self.env,  # the caller's settings win
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launcher.cli", *self.args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        """SIGKILL it if it still runs (a test's finally: no orphans, no grace needed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
