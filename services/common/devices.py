"""Device names in configs -> torch devices, the same rule for every process (`--device`)."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else the CPU; `cuda` -> this process's GPU (`local_rank` under
    torchrun), an error when there is none; anything else as torch spells it (`cpu`, `cuda:1`, `mps`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device(name)
