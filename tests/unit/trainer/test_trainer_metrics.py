"""trainer.metrics: the streaming gradient variance against torch.var, and the JSONL/TensorBoard writer."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.metrics import GradientVariance, MetricsWriter, mean_metrics, read_metrics


@pytest.mark.parametrize("M", [2, 3, 7])
def test_gradient_variance_matches_torch_var(M):
    g = torch.Generator().manual_seed(M)
    grads = [torch.randn(5, 3, generator=g) * (i + 1) + 2.0 for i in range(M)]
    acc = GradientVariance()
    for x in grads:
        acc.add(x)
    stacked = torch.stack(grads).double()
    ref = stacked.var(dim=0, unbiased=True).sum().item()
    m = acc.metrics()
    assert m["grad/variance"] == pytest.approx(ref, rel=1e-12)
    assert m["grad/variance_rel"] == pytest.approx(ref / stacked.mean(0).square().sum().item(), rel=1e-12)


def test_gradient_variance_edge_cases():
    acc = GradientVariance()
    assert acc.metrics() == {"grad/variance": 0.0, "grad/variance_rel": 0.0}
    for _ in range(3):
        acc.add(torch.zeros(4))
    assert acc.metrics()["grad/variance"] == 0.0 and math.isinf(acc.metrics()["grad/variance_rel"])


def test_mean_metrics_per_key():
    assert mean_metrics([{"a": 1.0, "b": 4.0}, {"a": 3.0}]) == {"a": 2.0, "b": 4.0}


def test_writer_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.write(1, 2, {"loss/lsm": 0.5, "queue/backlog": 3.0})
        w.write(2, 4, {"loss/lsm": 0.25})
    lines = read_metrics(tmp_path)
    assert [(x["batch"], x["step"], x["loss/lsm"]) for x in lines] == [(1, 2, 0.5), (2, 4, 0.25)]
    assert lines[0]["queue/backlog"] == 3.0 and "time" in lines[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/lsm")] == [(2, 0.5), (4, 0.25)]
