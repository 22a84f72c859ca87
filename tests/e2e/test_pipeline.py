"""`opd up` end to end: real Redis, teacher, rollout, worker and trainer processes on a tiny toy budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, name: str, max_batches: int, toy_budget: dict) -> Path:
    toy = tmp / "toy"
    cfg = {
        "up": {"name": name, "out_dir": str(tmp / "runs"), "prepare_toy": True},
        "toy": {"out": str(toy), **toy_budget},
        "teacher": {"model": str(toy / "models/teacher"), "device": "cpu"},
        "rollout": {"model": str(toy / "models/student"), "device": "cpu"},
        "worker": {
            "prompts": str(toy / "data/train.jsonl"),
            "tokenizer": str(toy / "models/student"),
            "verifier": "toy_arith",
            "group_size": 2,
            "max_new_tokens": 48,
            "top_k": 8,
            "concurrency": 2,
            "max_backlog": 8,
        },
        "trainer": {
            "model": str(toy / "models/student"),
            "device": "cpu",
            "top_k": 8,
            "batch_size": 8,
            "mini_batch_size": 4,
            "lr": 1e-3,
            "max_seq_len": 128,
            "max_batches": max_batches,
            "eval_every": 2,
            "eval_file": str(toy / "data/eval.jsonl"),
            "eval_verifier": "toy_arith",
            "eval_max_new_tokens": 48,
        },
    }
    path = tmp / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path


def opd_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    # The children of `opd up` (not `up` itself) that were started with this config file.
    return [
        line for line in out.splitlines() if marker in line and "launcher.cli" in line and " up " not in line
    ]


def test_up_runs_to_completion_and_reports(tmp_path: Path, tiny_toy_budget: dict) -> None:
    config = write_config(tmp_path, "e2e", max_batches=4, toy_budget=tiny_toy_budget)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs/e2e"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows if "loss/lsm" in r] == [1, 2, 3, 4]
    evals = [r["batch"] for r in rows if "eval/pass@1" in r]
    assert evals == [0, 2, 4]  # the starting student, then every eval_every batches
    assert all(r["train/policy_version"] == r["batch"] for r in rows if "loss/lsm" in r)
    report = (run / "report.md").read_text()
    assert "before (student at start)" in report and (run / "plots/training.png").stat().st_size > 1000
    assert {p.name for p in (run / "logs").iterdir()} == {
        "teacher-0.log",
        "rollout.log",
        "trainer.log",
        "worker-0.log",
    }
    assert opd_processes(str(config)) == []  # no orphans


def test_sigterm_stops_every_child(tmp_path: Path, tiny_toy_budget: dict) -> None:
    config = write_config(tmp_path, "stopme", max_batches=10_000, toy_budget=tiny_toy_budget)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "up", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "runs/stopme/metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.exists() and '"loss/lsm"' in metrics.read_text()):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training batch within 300 s"
            time.sleep(0.5)
        assert len(opd_processes(str(config))) == 4  # teacher, rollout, trainer, worker
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
        assert proc.returncode == 130
    finally:
        if proc.poll() is None:  # a failed assertion must not leave the pipeline running
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
    time.sleep(0.5)
    assert opd_processes(str(config)) == []
