"""`opd up` with two tasks end to end: one teacher deployment and one worker set per task (a prompt task
and an environment task), a shared rollout service and trainer, real processes and Redis; tiny random
models, so this checks the wiring, not learning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from trainer import checkpoint as ckpt

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_up_with_two_tasks(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    student = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=tok)
    math_teacher = make_tiny_llama(tmp_path / "math_teacher", seed=1, tokenizer=tok)
    rooms_teacher = make_tiny_llama(tmp_path / "rooms_teacher", seed=2, tokenizer=tok)
    prompts = tmp_path / "math.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(12))
    )
    cfg = {
        "up": {"name": "tasks", "out_dir": str(tmp_path / "runs"), "teacher_replicas": 1, "num_workers": 1},
        "teacher": {"model": str(math_teacher), "device": "cpu"},
        "rollout": {"model": str(student), "device": "cpu"},
        "worker": {
            "tokenizer": str(student),
            "group_size": 2,
            "max_new_tokens": 6,
            "top_k": 8,
            "max_backlog": 8,
        },
        "trainer": {
            "model": str(student),
            "device": "cpu",
            "top_k": 8,
            "batch_size": 4,
            "mini_batch_size": 4,
            "max_seq_len": 256,
            "max_batches": 4,
            "max_policy_lag": 4,
            "eval_every": 2,
            "eval_max_new_tokens": 6,
            "eval_max_prompts": 4,
        },
        "tasks": {
            "math": {"prompts": str(prompts), "verifier": "exact_match", "eval_file": str(prompts)},
            "rooms": {
                "env": "rooms",
                "env_options": {"num_receptacles": 2, "num_objects": 1},
                "max_turns": 2,
                "teacher_model": str(rooms_teacher),
                "eval_episodes": 2,
                "worker": {"max_new_tokens": 5},
            },
        },
    }
    config = tmp_path / "tasks.toml"
    config.write_bytes(tomli_w.dumps(cfg).encode())
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs/tasks"
    # One teacher and one worker per task, each teacher serving its task's model.
    logs = {p.stem for p in (run / "logs").iterdir()}
    assert {
        "teacher-math-0",
        "teacher-rooms-0",
        "worker-math-0",
        "worker-rooms-0",
        "rollout",
        "trainer",
    } <= logs
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/task_index"] for r in rows if "loss/lsm" in r] == [0.0, 1.0, 0.0, 1.0]
    assert [r["batch"] for r in rows if "task/math/eval/pass@1" in r] == [0, 2, 4]
    assert [r["batch"] for r in rows if "task/rooms/eval/success_rate" in r] == [0, 2, 4]
    lines = ckpt.read_commit_log(run / "checkpoints")
    assert [line["task"] for line in lines] == ["math", "rooms", "math", "rooms"]
    report = (run / "report.md").read_text()
    assert "task/math/eval/pass@1" in report and "task/rooms/eval/success_rate" in report
    assert (run / "plots" / "training.png").stat().st_size > 10_000
