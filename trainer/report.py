"""Plots (PNG) and report.md of a run directory, from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.metrics import read_metrics  # noqa: E402

PANELS = [
    ("eval/pass@1", "eval pass@1"),
    ("loss/lsm", "LSM loss"),
    ("loss/sampled_token", "sampled-token loss"),
    ("opd/reward_mean", "training reward (teacher - behaviour logprob)"),
    ("grad/norm", "grad norm"),
    ("opd/clip_frac", "clip fraction"),
    ("response/length", "response length"),
    ("teacher/gap_mean", "teacher - student logprob gap"),
    ("rollout/policy_lag", "policy lag"),
]


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs = [r.get("batch", i) for i, r in enumerate(rows) if key in r]
    ys = [r[key] for r in rows if key in r]
    return xs, ys


def plot_run(rows: list[dict], out: Path, title: str = "") -> Path:
    panels = [(k, label) for k, label in PANELS if series(rows, k)[1]]
    cols = 3
    n_rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.0 * n_rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        xs, ys = series(rows, key)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run_dir: Path) -> Path:
    """report.md with before/after eval accuracy and the training curves (plots/training.png)."""
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    _, evals = series(rows, "eval/pass@1")
    plot = plot_run(rows, run_dir / "plots" / "training.png", title=run_dir.name)
    lines = [f"# Run `{run_dir.name}`", ""]
    if evals:
        before, after = evals[0], evals[-1]
        lines += [
            "| | pass@1 |",
            "|---|---|",
            f"| before (student at start) | {before:.3f} |",
            f"| after ({rows[-1].get('batch', len(rows))} batches) | {after:.3f} |",
            f"| change | {after - before:+.3f} |",
            "",
        ]
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
