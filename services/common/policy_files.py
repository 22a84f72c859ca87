"""Where the trainer's weights live on disk, read by the trainer and by a (re)starting rollout service.

    <checkpoint_dir>/ckpt-<batch:08d>/dcp/     torch.distributed.checkpoint {"model": ..., "optim": ...}
                                   state.json   {"state": {"policy_version": N, ...}}
    <shared_dir>/policy-<version:08d>.safetensors         a push in `push_mode = "shared"`

A checkpoint directory is complete once it has its final name (written under a temporary name, then
renamed); `latest_policy()` is the newest weights in either layout, so a restarted rollout service serves
the trainer's newest committed version (`opd rollout serve --resume-from DIR`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CKPT_PREFIX = "ckpt-"
SHARED_PREFIX = "policy-"
DCP_DIR = "dcp"
STATE_FILE = "state.json"


def checkpoint_path(ckpt_dir: Path, batch: int) -> Path:
    return ckpt_dir / f"{CKPT_PREFIX}{batch:08d}"


def shared_path(shared_dir: Path, version: int) -> Path:
    return shared_dir / f"{SHARED_PREFIX}{version:08d}.safetensors"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


def latest_checkpoint_policy(ckpt_dir: str | Path) -> tuple[Path, int] | None:
    """(its DCP directory, policy_version) of the newest committed checkpoint, or None when there is none.

    Weights are pushed only after the checkpoint holding their version is committed, so this is never older
    than the last push when checkpoint_every divides push_every, and the trainer's next push brings a
    restarted service current otherwise.
    """
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return None
    state = json.loads((ckpts[-1] / STATE_FILE).read_text())["state"]
    return ckpts[-1] / DCP_DIR, int(state["policy_version"])


def latest_shared(shared_dir: str | Path) -> tuple[Path, int] | None:
    """(file, version) of the newest `policy-<N>.safetensors` a shared-mode push wrote, or None."""
    d = Path(shared_dir)
    files = sorted(d.glob(f"{SHARED_PREFIX}*.safetensors")) if d.is_dir() else []
    if not files:
        return None
    return files[-1], int(files[-1].stem[len(SHARED_PREFIX) :])


def latest_policy(directory: str | Path) -> tuple[Path, int] | None:
    """The newest trainer weights under `directory`: a checkpoint_dir (`ckpt-*`) or the directory of a
    shared-mode push (`policy-<N>.safetensors`), whichever holds the higher version."""
    found = [f for f in (latest_checkpoint_policy(directory), latest_shared(directory)) if f is not None]
    return max(found, key=lambda f: f[1]) if found else None


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A torch.distributed.checkpoint directory (the trainer's checkpoints), not safetensors."""
    return (Path(path) / ".metadata").is_file()


def read_dcp_model(
    path: str | Path, dtypes: Mapping[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """The model's full tensors (Hugging Face names) from a trainer checkpoint's DCP directory, resharded
    from however many ranks wrote it, on the CPU; floating tensors cast to `dtypes[name]` when given (the
    serving dtype: the checkpoint holds fp32 master weights). Needs no process group.

    DCP's metadata file is read with pickle: call this only on checkpoints the trainer wrote to storage it
    controls (the rollout service's `--resume-from`), never on uploaded data.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    prefix = "model."
    model_sd = {
        key[len(prefix) :]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in meta.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    dcp.load({"model": model_sd}, storage_reader=reader, no_dist=True)
    if dtypes:
        for name, t in model_sd.items():
            want = dtypes.get(name)
            if want is not None and t.is_floating_point():
                model_sd[name] = t.to(want)
    return model_sd
