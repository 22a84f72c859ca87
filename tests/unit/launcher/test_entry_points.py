"""Every `opd` entry point reports a bad configuration the same way: one line on stderr naming the field and
the value, exit code 2, no traceback (services/common/config.py `report_config_errors`)."""

from __future__ import annotations

import pytest

from launcher.cli import main


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["teacher", "serve", "--model", "m", "--port", "x"], "--port"),
        (["rollout", "serve", "--model", "m", "--port", "x"], "--port"),
        (["rollout", "work", "--prompts", "p.jsonl", "--group-size", "x"], "--group-size"),
        (["train", "--model", "m", "--batch-size", "x"], "--batch-size"),
        (["up", "--config", "CONFIG", "--num-workers", "x"], "--num-workers"),
        (["toy", "prepare", "--n-train", "x"], "--n-train"),
    ],
)
def test_bad_value_is_one_line_and_exit_2(argv, field, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[up]\nname = 't'\n")
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert field in err and "'x'" in err, err


def test_opd_up_without_a_file_names_the_flag(capsys):
    assert main(["up"]) == 2
    assert "--config" in capsys.readouterr().err
