"""CliProc (launcher/cli_proc.py): a real `python -m launcher.cli` child, its log, restart, stop."""

from launcher.cli_proc import CliProc


def test_child_runs_the_cli_and_a_restart_appends_to_its_log(tmp_path):
    proc = CliProc(["--help"], tmp_path / "cli.log").start()
    assert proc.proc.wait(60) == 0 and not proc.alive
    assert proc.log().count("usage: opd COMMAND") == 1
    proc.start()  # restarted on the same log: the earlier output stays
    assert proc.proc.wait(60) == 0
    assert proc.log().count("usage: opd COMMAND") == 2
    assert proc.terminate() == 0  # already exited: its exit code, no signal


def test_unknown_command_exits_nonzero_with_the_usage_in_the_log(tmp_path):
    proc = CliProc(["no-such-command"], tmp_path / "cli.log").start()
    assert proc.proc.wait(60) != 0
    assert "usage: opd COMMAND" in proc.log()


def test_terminate_and_cleanup_stop_a_running_child(tmp_path):
    # A service start imports torch (seconds): SIGTERM reaches it while it runs.
    args = ["rollout", "serve", "--model", str(tmp_path / "missing"), "--port", "0"]
    proc = CliProc(args, tmp_path / "a.log").start()
    assert proc.alive
    proc.terminate(timeout=60)
    assert not proc.alive
    proc = CliProc(args, tmp_path / "b.log").start()
    proc.cleanup()  # SIGKILL
    assert not proc.alive and proc.proc.returncode == -9
    proc.cleanup()  # nothing left to kill: a no-op
