"""Supervisor: finishing children, failing children, and process-group cleanup."""

import subprocess
import sys
import time

import pytest

from launcher.pipeline import check_sections
from launcher.supervisor import Child, ChildFailed, Supervisor
from services.common.config import ConfigError


def wait_exit(child: Child) -> None:
    child.proc.wait(30)


def test_exit_codes(tmp_path) -> None:
    sup = Supervisor(tmp_path)
    done = sup.start(Child("worker", [sys.executable, "-c", "pass"], may_finish=True))
    wait_exit(done)
    assert sup.check() is None  # a worker that finished its prompts is not a failure
    bad = sup.start(Child("teacher", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]))
    wait_exit(bad)
    with pytest.raises(ChildFailed, match="teacher exited with code 3(.|\n)*boom"):
        sup.check()
    sup = Supervisor(tmp_path)
    trainer = sup.start(Child("trainer", [sys.executable, "-c", "pass"], finishes_run=True))
    wait_exit(trainer)
    assert sup.check() is trainer


def test_stop_all_reaches_grandchildren(tmp_path) -> None:
    sup = Supervisor(tmp_path)
    # The child spawns a grandchild (as vLLM spawns workers); stop_all must end both.
    code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    child = sup.start(Child("svc", [sys.executable, "-c", code]))
    time.sleep(1.0)
    pgid = child.proc.pid
    sup.stop_all(grace_s=5)
    ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.splitlines()
    alive = [line for line in ps if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")]
    assert alive == []  # zombies left for init to reap are not running processes


def test_cross_section_checks(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[worker]\nmax_backlog = 8\ngroup_size = 4\ntop_k = 16\n[trainer]\nbatch_size = 64\ntop_k = 16\n"
    )
    with pytest.raises(ConfigError, match="must hold at least checkpoint_every trainer batches"):
        check_sections(path)
    path.write_text(
        "[worker]\nmax_backlog = 16\ngroup_size = 4\ntop_k = 8\n[trainer]\nbatch_size = 64\ntop_k = 16\n"
    )
    with pytest.raises(ConfigError, match="worker.top_k 8 < trainer.top_k 16"):
        check_sections(path)
    path.write_text(
        "[worker]\nmax_backlog = 16\ngroup_size = 4\n[trainer]\nbatch_size = 64\ncheckpoint_every = 2\n"
    )
    with pytest.raises(ConfigError, match="128 sequences"):
        check_sections(path)
