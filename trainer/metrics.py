"""Training metrics: a JSONL + TensorBoard writer, and the streaming gradient-variance estimator.

Keys are hierarchical (STYLE.md): `loss/lsm`, `opd/clip_frac`, `grad/norm`, `grad/variance`,
`student/entropy`, `teacher/gap_mean`, `support/teacher_mass`, `support/student_mass`, `response/length`,
`queue/backlog`, `queue/dropped_stale`, `queue/dead`, `rollout/policy_lag`, `perf/tokens_per_s`,
`time/read`, `time/loss`, `time/optim`, `time/push`, `time/checkpoint`, `eval/pass@1`, ...
One JSONL line per batch: {"batch": b, "step": s, "time": unix, <key>: value, ...}.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class GradientVariance:
    """Welford accumulation of gradients g_1..g_M (any shape) -> total variance and relative variance.

    total variance = sum_j Var_m[g_m[j]] (unbiased, / (M - 1)): the trace of the gradients' covariance.
    relative       = total variance / ||mean_m g_m||^2 (scale-free; large means the mini-batch signal is noise).
    Memory: two float64 copies of one gradient, whatever M is.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, grad: Tensor) -> None:
        g = grad.detach().to(torch.float64)
        self.count += 1
        mean, m2 = self.mean, self.m2
        if mean is None or m2 is None:
            self.mean, self.m2 = g.clone(), torch.zeros_like(g)
            return
        delta = g - mean
        mean += delta / self.count  # in place: self.mean and self.m2 are these tensors
        m2 += delta * (g - mean)

    def metrics(self) -> dict[str, float]:
        mean, m2 = self.mean, self.m2
        if self.count < 2 or mean is None or m2 is None:
            return {"grad/variance": 0.0, "grad/variance_rel": 0.0}
        total = float(m2.sum()) / (self.count - 1)
        mean_sq = float((mean * mean).sum())
        return {"grad/variance": total, "grad/variance_rel": total / mean_sq if mean_sq > 0 else math.inf}


def mean_metrics(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the dicts that have the key (mini-batch metrics -> one batch line)."""
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in sorted(keys)}


def weighted_mean(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Per-key mean weighted by each dict's weight (micro-batch metrics weighted by their loss tokens).

    Weights that sum to 0 (no loss tokens anywhere) give the plain mean, so the keys never go missing."""
    if not parts:
        return {}
    total = sum(w for _, w in parts)
    if total <= 0:
        return mean_metrics([d for d, _ in parts])
    keys = sorted({k for d, _ in parts for k in d})
    return {k: sum(d.get(k, 0.0) * w for d, w in parts) / total for k in keys}


class MetricsWriter:
    """Appends one JSON line per call to `<dir>/metrics.jsonl` and, if asked, TensorBoard scalars."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

            self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))

    def write(self, batch: int, step: int, metrics: dict[str, float]) -> None:
        line = {"batch": batch, "step": step, "time": time.time(), **metrics}
        self._fh.write(json.dumps(line, allow_nan=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(log_dir: str | Path) -> list[dict[str, Any]]:
    """All lines of `<dir>/metrics.jsonl` (tests, plots)."""
    path = Path(log_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
