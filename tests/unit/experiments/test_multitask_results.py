"""`opd experiment multitask` outputs: per-task summaries from metrics rows, the table, the curves PNG."""

from __future__ import annotations

import pytest

from experiments import paper as experiments
from experiments.multitask_results import plot_task_curves, summarize_tasks, task_eval_keys, tasks_table


def rows_of(pass_at_1: list[float], success: list[float], every: int = 2) -> list[dict]:
    """Metrics rows like the trainer's: an eval row at batch 0, then training rows with an eval every
    `every` batches, alternating tasks."""
    rows = [
        {
            "batch": 0,
            "step": 0,
            "task/math/eval/pass@1": pass_at_1[0],
            "task/rooms/eval/success_rate": success[0],
        }
    ]
    for b in range(1, every * (len(pass_at_1) - 1) + 1):
        task = "math" if b % 2 else "rooms"
        row = {"batch": b, "step": b, "loss/lsm": 1.0 / b, f"task/{task}/loss/lsm": 1.0 / b}
        if b % every == 0:
            row["task/math/eval/pass@1"] = pass_at_1[b // every]
            row["task/rooms/eval/success_rate"] = success[b // every]
        rows.append(row)
    return rows


def test_summary_has_before_last_best_per_task():
    rows = rows_of([0.1, 0.5, 0.4], [0.0, 0.25, 0.5])
    assert task_eval_keys(rows) == ["task/math/eval/pass@1", "task/rooms/eval/success_rate"]
    s = summarize_tasks(rows)
    assert s["math pass@1/before"] == 0.1 and s["math pass@1/final"] == 0.4
    assert s["rooms success_rate/before"] == 0.0 and s["rooms success_rate/final"] == 0.5
    assert s["math pass@1/at_batch"] == 4.0 and s["batches"] == 4.0
    assert not any(k.endswith(("/best", "/selected")) for k in s)  # no best-of-test, no validation eval
    # With a validation eval the test value at the best validation eval is reported, chosen on val alone.
    for row, v in zip([r for r in rows if "task/math/eval/pass@1" in r], [0.2, 0.1, 0.3], strict=True):
        row["task/math/val/pass@1"] = v
    assert summarize_tasks(rows)["math pass@1/selected"] == 0.4
    assert "math pass@1 val-selected" in tasks_table({"LSM": [summarize_tasks(rows)]})
    with pytest.raises(ValueError, match="no task/<name>/eval"):
        summarize_tasks([{"batch": 1, "loss/lsm": 1.0, "eval/pass@1": 0.3}])


def test_summary_has_lenient_lengths_and_end_marker_shares_per_task():
    rows = rows_of([0.1, 0.5, 0.4], [0.0, 0.25, 0.5])
    evals = [r for r in rows if "task/math/eval/pass@1" in r]
    for row, lenient, length, eos in zip(
        evals, [0.2, 0.6, 0.7], [40.0, 50.0, 63.0], [1.0, 0.5, 0.25], strict=True
    ):
        row.update({"task/math/eval/pass@1_lenient": lenient, "task/math/eval/length": length})
        row["task/math/eval/ends_own_eos"] = eos
    training = [r for r in rows if "loss/lsm" in r]
    for i, row in enumerate(training):
        task = "math" if row["batch"] % 2 else "rooms"
        row.update(
            {f"task/{task}/response/ends_own_eos": 1.0 - 0.25 * i, f"task/{task}/response/length_cap": 0.5}
        )
    s = summarize_tasks(rows)
    assert s["math pass@1 lenient/before"] == 0.2 and s["math pass@1 lenient/final"] == 0.7
    assert s["math eval length/final"] == 63.0 and s["math eval own eos/final"] == 0.25
    assert "math eval length/before" not in s
    # run means over the task's own training batches (math at batches 1 and 3, rooms at 2 and 4)
    assert s["math own eos/run"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["rooms own eos/run"] == pytest.approx((0.75 + 0.25) / 2)
    assert s["rooms length cap/run"] == 0.5 and "rooms other marker/run" not in s
    assert "rooms pass@1 lenient/final" not in s  # an environment task has no lenient score
    header = tasks_table({"LSM": [s]}).splitlines()[0]
    for column in (
        "math pass@1 lenient last",
        "math eval own eos last",
        "math length cap (run)",
        "rooms own eos (run)",
    ):
        assert column in header
    assert "math eval length before" not in header and "rooms other marker" not in header
    assert "| 63.0 ± 0.0 |" in tasks_table({"LSM": [s]})  # a length in tokens, one decimal


def test_table_is_mean_and_std_over_seeds():
    results = {
        "LSM": [
            summarize_tasks(rows_of([0.1, 0.3], [0.0, 0.5])),
            summarize_tasks(rows_of([0.1, 0.5], [0.0, 1.0])),
        ],
        "sampled-token OPD": [summarize_tasks(rows_of([0.1, 0.2], [0.0, 0.0]))],
    }
    table = tasks_table(results)
    lines = table.strip().splitlines()
    assert lines[0].startswith(
        "| variant | seeds | math pass@1 before | math pass@1 last | rooms success_rate"
    )
    assert "rooms success_rate last" in lines[0]
    lsm = next(line for line in lines if line.startswith("| LSM |"))
    cells = [c.strip() for c in lsm.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == "0.400 ± 0.141" and cells[5] == "0.750 ± 0.354"
    opd = next(line for line in lines if line.startswith("| sampled-token OPD |"))
    assert "0.200 ± 0.000" in opd


def test_curves_png_has_the_task_panels(tmp_path):
    curves = {
        "LSM": [rows_of([0.1, 0.3, 0.5], [0.0, 0.5, 0.5])],
        "OPD": [rows_of([0.1, 0.2, 0.2], [0.0, 0.0, 0.5])],
    }
    out = plot_task_curves(curves, tmp_path / "curves.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_multitask_experiment_is_table_2():
    variants = experiments.EXPERIMENTS["multitask"]
    assert {
        (v.overrides["trainer"]["objective"], v.overrides["trainer"]["special_token_masking"])
        for v in variants
    } == {
        ("sampled_token", False),
        ("lsm", False),
        ("lsm", True),
    }
    assert experiments.DEFAULT_BASE["multitask"] == "configs/multitask_toy.toml"
