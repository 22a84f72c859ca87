"""Where the trainer's weights live on disk, read by the trainer and by a (re)starting rollout service.

    <checkpoint_dir>/ckpt-<batch:08d>/model.safetensors   + state.json {"state": {"policy_version": N, ...}}
    <shared_dir>/policy-<version:08d>.safetensors         a push in `push_mode = "shared"`

A checkpoint directory is complete once it has its final name (written under a temporary name, then
renamed); `latest_policy()` is the newest weights in either layout, so a restarted rollout service serves
the trainer's newest committed version (`opd rollout serve --resume-from DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path

CKPT_PREFIX = "ckpt-"
SHARED_PREFIX = "policy-"
MODEL_FILE = "model.safetensors"
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
    """(model.safetensors, policy_version) of the newest committed checkpoint, or None when there is none.

    Weights are pushed only after the checkpoint holding their version is committed, so this is never older
    than the last push when checkpoint_every divides push_every, and the trainer's next push brings a
    restarted service current otherwise.
    """
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return None
    state = json.loads((ckpts[-1] / STATE_FILE).read_text())["state"]
    return ckpts[-1] / MODEL_FILE, int(state["policy_version"])


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
