"""Plots (PNG) and report.md of a run directory, from its metrics.jsonl."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.metrics import read_metrics  # noqa: E402

# Panels of every curve plot: (metrics key, title). Keys a run never logs (clip fraction under LSM) are skipped.
PANELS = [
    ("eval/pass@1", "eval pass@1, strict (greedy)"),
    ("eval/pass@1_lenient", "eval pass@1, lenient (greedy)"),
    ("val/pass@1", "validation pass@1, strict (greedy)"),
    ("opd/reward_mean", "training reward (teacher - behaviour logprob)"),
    ("grad/norm", "grad norm"),
    ("opd/clip_frac", "clip fraction"),
    ("response/length", "response length"),
    ("teacher/gap_mean", "teacher - student logprob gap"),
    ("loss/lsm", "LSM loss"),
    ("loss/sampled_token", "sampled-token loss"),
    ("rollout/policy_lag", "policy lag"),
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(
    per_seed: list[list[dict[str, Any]]], key: str
) -> tuple[list[float], list[float], list[float]]:
    """Batches where every seed logged `key`, and the across-seed mean and std there."""
    by_seed = [{r["batch"]: float(r[key]) for r in rows if key in r and "batch" in r} for rows in per_seed]
    by_seed = [d for d in by_seed if d]
    if not by_seed:
        return [], [], []
    xs = sorted(set.intersection(*(set(d) for d in by_seed)))
    stats = [mean_std([d[x] for d in by_seed]) for x in xs]
    return [float(x) for x in xs], [m for m, _ in stats], [s for _, s in stats]


def plot_curves(
    curves: dict[str, list[list[dict[str, Any]]]],
    out: Path,
    title: str = "",
    panels: Sequence[tuple[str, str]] = PANELS,
) -> Path:
    """One panel per metric of `panels` that some variant logged; one line (mean, ± std band) per variant."""
    panels = [(k, t) for k, t in panels if any(mean_curve(runs, k)[0] for runs in curves.values())]
    cols = 3
    n_rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.4 * cols, 3.1 * n_rows), squeeze=False)
    # One colour per variant in every panel, also in panels that only some variants log.
    colors = {label: f"C{i % 10}" for i, label in enumerate(curves)}
    for ax, (key, panel_title) in zip(axes.flat, panels, strict=False):
        for label, runs in curves.items():
            xs, mean, std = mean_curve(runs, key)
            if not xs:
                continue
            ax.plot(xs, mean, label=label, color=colors[label], marker="o" if len(xs) < 15 else None, ms=3)
            if any(std):
                lo = [m - s for m, s in zip(mean, std, strict=True)]
                hi = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.15)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if panels and len(curves) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[label], label=label) for label in curves]
        axes.flat[0].legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def select_checkpoint(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The eval row of the checkpoint selected on the VALIDATION split: the highest `val/pass@1` (strict),
    the earliest batch on a tie; None when the run logged no validation eval. Only `val/...` keys choose;
    the caller reports the test scores (`eval/...`) of the chosen row."""
    candidates = [r for r in rows if "val/pass@1" in r and "eval/pass@1" in r]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (float(r["val/pass@1"]), -float(r.get("batch", 0))))


def task_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """Panels of a multi-task run, before PANELS: each task's eval (pass@1 or success rate), then its loss."""
    evals: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.startswith("task/") and key.endswith(("/eval/pass@1", "/eval/success_rate")):
                evals.setdefault(key, None)
    tasks = list(dict.fromkeys(k.split("/")[1] for k in evals))
    panels = [(k, f"{k.split('/')[1]} {k.rsplit('/', 1)[1]} (greedy)") for k in evals]
    panels += [
        (f"task/{t}/{loss}", f"{t}: {loss}") for t in tasks for loss in ("loss/lsm", "loss/sampled_token")
    ]
    return panels


def plot_run(rows: list[dict], out: Path, title: str = "") -> Path:
    """The curves of one run: plot_curves with one variant of one seed (and its tasks' panels, if any)."""
    return plot_curves({title or "run": [rows]}, out, title=title, panels=task_panels(rows) + PANELS)


def _task_evals(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per-task eval metric (task/<name>/eval/pass@1 or success_rate) -> (first, last) value."""
    out: dict[str, tuple[float, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("task/") and key.endswith(("/eval/pass@1", "/eval/success_rate")):
                out[key] = (out.get(key, (value, value))[0], value)
    return out


def write_report(run_dir: Path) -> Path:
    """report.md with before/after eval accuracy (strict pass@1, the lenient one beside it, and the
    checkpoint selected on validation) and the training curves (plots/training.png)."""
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    evals = [r for r in rows if "eval/pass@1" in r]
    plot = plot_run(rows, run_dir / "plots" / "training.png", title=run_dir.name)
    lines = [f"# Run `{run_dir.name}`", ""]
    if evals:

        def cells(row: dict) -> str:
            lenient = row.get("eval/pass@1_lenient")
            return f"{row['eval/pass@1']:.3f} | " + ("–" if lenient is None else f"{lenient:.3f}")

        before, after = evals[0], evals[-1]
        lines += [
            "pass@1 (strict): right answer AND the completion ends with the student's own end marker; "
            "lenient: right answer, cut at the first special token of either model.",
            "",
            "| | pass@1 | lenient pass@1 |",
            "|---|---|---|",
            f"| before (student at start) | {cells(before)} |",
            f"| after ({rows[-1].get('batch', len(rows))} batches) | {cells(after)} |",
            f"| change | {after['eval/pass@1'] - before['eval/pass@1']:+.3f} | |",
        ]
        selected = select_checkpoint(rows)
        if selected is not None:
            lines.append(
                f"| selected on validation (batch {selected.get('batch', 0)}, val {selected['val/pass@1']:.3f}) "
                f"| {cells(selected)} |"
            )
        lines.append("")
    elif task_evals := _task_evals(rows):
        lines += ["| task eval | before | after | change |", "|---|---|---|---|"]
        for key, (before_t, after_t) in task_evals.items():
            lines.append(f"| {key} | {before_t:.3f} | {after_t:.3f} | {after_t - before_t:+.3f} |")
        lines.append("")
    else:
        lines += ["No evaluation ran (set trainer.eval_every).", ""]
    last = rows[-1] if rows else {}
    keys = [
        "loss/lsm",
        "loss/sampled_token",
        "grad/norm",
        "response/length",
        "teacher/gap_mean",
        "queue/dropped_stale",
        "perf/tokens_per_s",
    ]
    lines += [f"- final `{k}`: {last[k]:.4g}" for k in keys if isinstance(last.get(k), int | float)]
    lines += ["", f"![training curves]({plot.relative_to(run_dir)})", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
