"""Results of `opd experiment multitask` (the paper's Table 2 setting): per-task eval summaries of a run,
the table over variants and seeds, and the curve panels.

Each task's eval metric is what the trainer logs for it (trainer/train.py `_eval_tasks`):
`task/<name>/eval/pass@1` for a prompt task (greedy, through the rollout service) and
`task/<name>/eval/success_rate` for an environment task (greedy episodes on held-out seeds).

Beside it, per task: the lenient pass@1 of a prompt task (an answer closed by the teacher's end marker also
counts), the last eval's completion length and share ending with the student's own end marker, and over
the whole run the shares of training samples that ended with the student's end marker, held the other
model's marker, or ran to the length cap (the special-token failure modes, as in the single-task table).

No "best" over the test evals is reported (a maximum over test scores picks the checkpoint on the test set
and overstates it). Where a task also logs a validation eval (`task/<name>/val/...`, same metric), the
"val-selected" column is the test value at the eval with the best validation value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from experiments.report import PANELS, mean_std, plot_curves, task_panels

EVAL_KEY = re.compile(r"^task/([^/]+)/eval/(pass@1|success_rate)$")
# (metric under task/<name>/eval/, its column title, the evals reported: last, or first and last)
EVAL_EXTRAS = (
    ("pass@1_lenient", "pass@1 lenient", ("before", "final")),
    ("length", "eval length", ("final",)),
    ("ends_own_eos", "eval own eos", ("final",)),
)
# (metric under task/<name>/response/, its column title): the mean over the run's training batches
RUN_SHARES = (("ends_own_eos", "own eos"), ("other_special", "other marker"), ("length_cap", "length cap"))


def task_eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The per-task eval keys a run logged, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if EVAL_KEY.match(key):
                seen.setdefault(key, None)
    return list(seen)


def short(key: str) -> str:
    """`task/rooms/eval/success_rate` -> `rooms success_rate`."""
    task, metric = EVAL_KEY.match(key).groups()
    return f"{task} {metric}"


def summarize_tasks(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per task eval metric: its first value (the student before training), last, the batch of the last
    one, and with a validation eval the test value selected on it (`selected`); plus the batches trained.
    Raises when the run logged no per-task eval."""
    keys = task_eval_keys(rows)
    if not keys:
        raise ValueError("the run logged no task/<name>/eval/... (trainer.eval_every = 0, or no tasks?)")
    out: dict[str, float] = {}
    for key in keys:
        points = [(r.get("batch", 0), float(r[key])) for r in rows if key in r]
        name = short(key)
        out[f"{name}/before"] = points[0][1]
        out[f"{name}/final"] = points[-1][1]
        out[f"{name}/at_batch"] = float(points[-1][0])
        val_key = key.replace("/eval/", "/val/")
        both = [r for r in rows if key in r and val_key in r]
        if both:  # highest validation value, earliest batch on a tie; the test value is only reported
            chosen = max(both, key=lambda r: (float(r[val_key]), -float(r.get("batch", 0))))
            out[f"{name}/selected"] = float(chosen[key])
        task = key.split("/")[1]
        for extra, title, parts in EVAL_EXTRAS:  # beside the headline: lenient, length, end markers
            extra_points = [
                float(r[f"task/{task}/eval/{extra}"]) for r in rows if f"task/{task}/eval/{extra}" in r
            ]
            if extra_points:
                for part in parts:
                    out[f"{task} {title}/{part}"] = extra_points[0 if part == "before" else -1]
        for metric, title in RUN_SHARES:  # averaged over every training batch of the task
            values = [
                float(r[f"task/{task}/response/{metric}"])
                for r in rows
                if f"task/{task}/response/{metric}" in r
            ]
            if values:
                out[f"{task} {title}/run"] = sum(values) / len(values)
    out["batches"] = float(max((r.get("batch", 0) for r in rows), default=0))
    return out


def tasks_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per variant, `mean ± std` over seeds of each task's before / last eval, its
    val-selected eval where a run has one, and the extras beside them (columns only where a run has them)."""
    names = list(
        dict.fromkeys(k.rsplit("/", 1)[0] for runs in results.values() for s in runs for k in s if "/" in k)
    )
    titles = {"before": "before", "final": "last", "selected": "val-selected", "run": "(run)"}
    columns = [
        (name, part)
        for name in names
        for part in titles
        if any(f"{name}/{part}" in s for runs in results.values() for s in runs)
    ]
    header = ["variant", "seeds"] + [f"{name} {titles[part]}" for name, part in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in results.items():
        cells = [label, str(len(runs))]
        for name, part in columns:
            values = [s[f"{name}/{part}"] for s in runs if f"{name}/{part}" in s]
            mean, std = mean_std(values)
            digits = 1 if name.endswith(" length") else 3  # lengths in tokens, the rest rates
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if values else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_task_curves(curves: dict[str, list[list[dict[str, Any]]]], out: Path, title: str = "") -> Path:
    """Curves with the per-task eval panels first, then each task's loss, then the usual panels."""
    rows = [r for runs in curves.values() for seed in runs for r in seed]
    return plot_curves(curves, out, title=title, panels=task_panels(rows) + PANELS)
