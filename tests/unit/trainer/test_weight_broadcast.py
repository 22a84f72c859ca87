"""trainer.weight_broadcast and its config: push_mode = "collective" and its options are validated; the
weights of a push are read exactly once (FSDP ranks gather in step with rank 0), even when nothing is sent."""

from __future__ import annotations

import pytest
import torch

from services.common.config import ConfigError
from trainer.config import TrainerConfig
from trainer.weight_broadcast import _ReadOnce
from trainer.weight_sync import StateDictWeights


def test_collective_config():
    cfg = TrainerConfig(model="m", push_mode="collective", rollout_urls=["http://r:8000"])
    assert (cfg.collective_backend, cfg.collective_port, cfg.collective_bucket_mb) == ("auto", 0, 64)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(push_mode="broadcast"), "push_mode: 'broadcast'"),
        (dict(collective_backend="mpi"), "collective_backend: 'mpi'"),
        (dict(collective_port=70000), "collective_port: 70000"),
        (dict(collective_timeout_s=0.0), "collective_timeout_s: 0.0"),
        (dict(collective_bucket_mb=0), "collective_bucket_mb: 0"),
    ],
)
def test_collective_config_names_the_bad_value(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(**{"model": "m", **kw})


class Counting(StateDictWeights):
    def __init__(self, sd) -> None:
        super().__init__(sd)
        self.passes = 0
        self.read = 0

    def tensors(self):
        self.passes += 1
        for item in super().tensors():
            self.read += 1
            yield item


def test_weights_are_read_once_to_their_end():
    sd = {f"w{i}": torch.ones(2) for i in range(4)}
    untouched = Counting(sd)
    _ReadOnce(untouched).finish()  # a push that sent nothing still reads them
    assert (untouched.passes, untouched.read) == (1, 4)
    half = Counting(sd)
    once = _ReadOnce(half)
    it = once.tensors()
    next(it)
    once.finish()  # a push that failed midway reads the rest
    assert (half.passes, half.read) == (1, 4)
    with pytest.raises(AssertionError):
        once.tensors()
