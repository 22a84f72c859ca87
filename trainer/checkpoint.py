"""Atomic checkpoints and the commit log that makes stream consumption exactly-once.

Layout of `checkpoint_dir`:

    ckpt-00000012/      model.safetensors, optimizer.pt, rng.pt, state.json    (one per checkpointed batch)
    commits.jsonl       one line per committed batch: {"batch", "step", "policy_version", "task",
                        "entries", "records", "stale_entries", "stale_records"}; with tasks configured
                        the entry ids are those of the line's task's stream (ids are unique per stream)

Saving writes everything into a `.tmp-*` directory (fsynced), appends the new commit lines (fsynced), then
renames the directory to `ckpt-<batch>` (fsynced parent): the rename is the commit point. Loading takes the
newest `ckpt-*`, removes leftover `.tmp-*` directories, and keeps only the commit lines whose batch is <=
that checkpoint's batch: a line whose checkpoint never got renamed belongs to training that is lost, and
its entries (still pending in Redis) will be trained again.

Exactly-once argument (see trainer/train.py for the order of operations). An entry leaves the stream's
pending list (XACK + XDEL) only after the checkpoint whose commit log lists it is renamed into place. After
a crash, the trainer reloads the newest checkpoint and claims its pending entries: those listed in the
surviving commit log are already in the model (or were dropped as stale), so they are only acked; the rest
are trained again, starting from a model that has not seen them. Hence every entry ends up either in
exactly one committed batch (trained once) or in one committed stale list.

Model weights go through safetensors; optimizer and RNG state through torch.save of tensors and plain
containers, read back with `weights_only=True` (local files we wrote, never network input).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from services.common.policy_files import MODEL_FILE, STATE_FILE, checkpoint_path, list_checkpoints

COMMIT_LOG = "commits.jsonl"


@dataclass
class TrainState:
    """Counters that a checkpoint restores; `batch` numbers the batches trained so far (1-based after one)."""

    batch: int = 0
    step: int = 0  # optimizer steps
    policy_version: int = 0
    records_trained: int = 0
    sequences_trained: int = 0
    tokens_trained: int = 0
    dropped_stale: int = 0
    dead: int = 0
    consumer: str = ""


@dataclass
class Loaded:
    path: Path | None
    state: TrainState
    commits: list[dict[str, Any]]

    @property
    def committed_entries(self) -> set[str]:
        """Stream entry ids already accounted for (trained or dropped as stale)."""
        return {e for line in self.commits for e in line.get("entries", []) + line.get("stale_entries", [])}

    def committed_entries_of(self, task: str) -> set[str]:
        """The committed entry ids of one task's stream ("" = the single-task stream)."""
        return {
            e
            for line in self.commits
            if line.get("task", "") == task
            for e in line.get("entries", []) + line.get("stale_entries", [])
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer may draw from, as tensors and plain values (loadable with weights_only)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _append_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def append_commits(ckpt_dir: str | Path, lines: list[dict[str, Any]]) -> None:
    """Append commit lines durably (used directly only for stale-only lines, which change no weights)."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    _append_lines(d / COMMIT_LOG, lines)


def read_commit_log(ckpt_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of the commit log (a torn last line from a crash is skipped)."""
    path = Path(ckpt_dir) / COMMIT_LOG
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            if not raw.endswith("\n"):
                break  # torn write: the process died mid-line, so its checkpoint was never renamed
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                break
    return out


def save_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    commits: list[dict[str, Any]],
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `ckpt-<state.batch>` atomically, appending `commits` to the commit log first."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, state.batch)
    if final.exists():
        raise FileExistsError(f"{final} exists: batch numbers only increase")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d))
    safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"state": dataclasses.asdict(state), **(extra or {})}, indent=1))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    _append_lines(d / COMMIT_LOG, commits)
    os.rename(tmp, final)  # the commit point
    _fsync_dir(d)
    for old in list_checkpoints(d)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(
    ckpt_dir: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> Loaded:
    """Restore the newest checkpoint into `model`/`optimizer` (when given) and repair the commit log.

    With no checkpoint, returns a fresh TrainState and the commit lines of batch 0 (stale-only lines).
    """
    d = Path(ckpt_dir)
    if d.is_dir():
        for leftover in d.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    ckpts = list_checkpoints(d)
    path = ckpts[-1] if ckpts else None
    state = TrainState()
    if path is not None:
        state = TrainState(**json.loads((path / STATE_FILE).read_text())["state"])
        if model is not None:
            safetensors.torch.load_model(model, str(path / MODEL_FILE), strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        if restore_rng:
            set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    lines = read_commit_log(d)
    kept = [line for line in lines if line["batch"] <= state.batch]
    if len(kept) != len(lines) or (d / COMMIT_LOG).exists() and _has_torn_tail(d / COMMIT_LOG):
        _rewrite_log(d, kept)
    return Loaded(path=path, state=state, commits=kept)


def _has_torn_tail(path: Path) -> bool:
    data = path.read_bytes()
    return bool(data) and not data.endswith(b"\n")


def _rewrite_log(d: Path, lines: list[dict[str, Any]]) -> None:
    tmp = d / (COMMIT_LOG + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / COMMIT_LOG)
    _fsync_dir(d)
