"""Sharded, asynchronous, atomic checkpoints and the commit log that makes stream consumption exactly-once.

Layout of `checkpoint_dir`:

    ckpt-00000012/      one per checkpointed batch:
        dcp/            torch.distributed.checkpoint of {"model": ..., "optim": ...}: every rank writes its
                        own shard (FSDP2) or its share of the replicated tensors; fp32 master weights
        rng-<rank>.pt   each rank's RNG state
        state.json      TrainState (+ the config), written last by rank 0
    commits.jsonl       one line per committed batch: {"batch", "step", "policy_version", "task",
                        "entries", "records", "stale_entries", "stale_records"}; with tasks configured
                        the entry ids are those of the line's task's stream (ids are unique per stream)

Saving writes into `.tmp-ckpt-<batch>` (every rank its files, fsynced); when rank 0's write completes (its
DCP future resolves only after every rank's shard and the metadata are written) rank 0 writes state.json,
appends the new commit lines (fsynced), then renames the directory to `ckpt-<batch>` (fsynced parent): the
rename is the commit point. With `async_save` the write runs in a background thread on a copy of the state
(DCP stages it to host memory before returning) while training goes on; the next checkpoint waits for it.
Loading takes the newest `ckpt-*`, removes leftover `.tmp-*` directories, and keeps only the commit lines
whose batch is <= that checkpoint's batch: a line whose checkpoint never got renamed belongs to training
that is lost, and its entries (still pending in Redis) will be trained again. DCP reshards on load, so a
run can resume on a different number of ranks (or switch between the replicate and fsdp layouts).

Exactly-once argument (see trainer/train.py for the order of operations). An entry leaves the stream's
pending list (XACK + XDEL) only after the checkpoint whose commit log lists it is renamed into place (the
trainer acks the lines `Checkpointer` returns as committed). After a crash, the trainer reloads the newest
checkpoint and claims its pending entries: those listed in the surviving commit log are already in the model
(or were dropped as stale), so they are only acked; the rest are trained again, starting from a model that
has not seen them. Hence every entry ends up either in exactly one committed batch (trained once) or in one
committed stale list.

DCP writes tensors in its own format (`.distcp` files plus a `.metadata` file, which torch reads with
pickle): these are local files this trainer wrote, never network input. RNG state is read back with
`weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from services.common.policy_files import (
    DCP_DIR,
    STATE_FILE,
    checkpoint_path,
    list_checkpoints,
)

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


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} keyed by parameter names: DTensor shards under FSDP2, plain tensors
    otherwise (DCP writes replicated tensors once and reshards either kind on load)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


@dataclass
class _InFlight:
    future: Future[Any] | None  # None once written (a synchronous save)
    tmp: Path
    final: Path
    state: TrainState  # a snapshot: training moves on while the write runs
    lines: list[dict[str, Any]]


class Checkpointer:
    """Writes `ckpt-<batch>` from every rank and commits it from rank 0; see the module docstring.

    `save` starts a checkpoint (after finishing the previous one); `poll` finishes it if its write is done;
    `wait` finishes it now. Each returns the commit lines that became durable (rank 0; [] elsewhere): the
    caller acks exactly those entries. Every rank must call `save` and `wait` at the same batches.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        *,
        rank: int = 0,
        keep: int = 2,
        async_save: bool = False,
        group: dist.ProcessGroup | None = None,
        extra: dict[str, Any] | None = None,
        committed_batch: int = 0,
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.committed_batch = committed_batch  # the batch of the newest renamed checkpoint
        self.rank = rank
        self.keep = keep
        self.async_save = async_save
        self.group = group
        self.extra = extra or {}
        self.inflight: _InFlight | None = None

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        lines: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        import torch.distributed.checkpoint as dcp

        committed = self.wait()
        final = checkpoint_path(self.dir, state.batch)
        if final.exists():
            raise FileExistsError(f"{final} exists: batch numbers only increase")
        tmp = self.dir / f".tmp-{final.name}"
        tmp.mkdir(parents=True, exist_ok=True)
        rng_file = tmp / f"rng-{self.rank}.pt"
        torch.save(rng_state(), rng_file)
        _fsync_file(rng_file)
        writer = dcp.FileSystemWriter(str(tmp / DCP_DIR), sync_files=True)
        sd = _state_dicts(model, optimizer)
        future: Future[Any] | None = None
        no_dist = not dist.is_initialized()
        if self.async_save:
            response = dcp.async_save(sd, storage_writer=writer, process_group=self.group, no_dist=no_dist)
            # with the writer as its own stager (no async_stager given), async_save returns the upload future
            assert isinstance(response, Future)
            future = response
        else:
            dcp.save(sd, storage_writer=writer, process_group=self.group, no_dist=no_dist)
        self.inflight = _InFlight(future, tmp, final, dataclasses.replace(state), list(lines))
        if not self.async_save:
            committed += self.wait()
        return committed

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    def poll(self) -> list[dict[str, Any]]:
        """Finish the checkpoint in flight if its write is done (never blocks)."""
        fl = self.inflight
        if fl is None or (fl.future is not None and not fl.future.done()):
            return []
        return self.wait()

    def wait(self) -> list[dict[str, Any]]:
        """Finish the checkpoint in flight (blocking until its write is done); rank 0 commits it."""
        fl, self.inflight = self.inflight, None
        if fl is None:
            return []
        if fl.future is not None:
            fl.future.result()  # re-raises a failed write: nothing is committed, nothing is acked
        self.committed_batch = fl.state.batch
        if self.rank != 0:
            return []
        (fl.tmp / STATE_FILE).write_text(
            json.dumps({"state": dataclasses.asdict(fl.state), **self.extra}, indent=1)
        )
        _fsync_file(fl.tmp / STATE_FILE)
        _fsync_dir(fl.tmp)
        _append_lines(self.dir / COMMIT_LOG, fl.lines)
        os.rename(fl.tmp, fl.final)  # the commit point
        _fsync_dir(self.dir)
        for old in list_checkpoints(self.dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return fl.lines


def save_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    commits: list[dict[str, Any]],
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write and commit checkpoint `ckpt-<state.batch>` now (single process, or every rank at once)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    Checkpointer(ckpt_dir, rank=rank, keep=keep, extra=extra).save(model, optimizer, state, commits)
    return checkpoint_path(Path(ckpt_dir), state.batch)


def load_latest(
    ckpt_dir: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> Loaded:
    """Restore the newest checkpoint into `model`/`optimizer` (when given) and repair the commit log.

    With a process group every rank must call this (DCP loads collectively, resharding as needed); only
    rank 0 repairs the directory. With no checkpoint, returns a fresh TrainState and the commit lines of
    batch 0 (stale-only lines).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    d = Path(ckpt_dir)
    if d.is_dir() and rank == 0:
        for leftover in d.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    ckpts = list_checkpoints(d)
    path = ckpts[-1] if ckpts else None
    state = TrainState()
    if path is not None:
        state = TrainState(**json.loads((path / STATE_FILE).read_text())["state"])
        if model is not None:
            sd = _state_dicts(model, optimizer)
            dcp.load(sd, checkpoint_id=str(path / DCP_DIR), no_dist=not dist.is_initialized())
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            else:
                set_model_state_dict(model, sd["model"])
        rng_file = path / f"rng-{rank}.pt"
        if restore_rng and rng_file.exists():  # a rank the saving run did not have starts from its seed
            set_rng_state(torch.load(rng_file, weights_only=True))
    lines = read_commit_log(d)
    kept = [line for line in lines if line["batch"] <= state.batch]
    if rank == 0 and (
        len(kept) != len(lines) or (d / COMMIT_LOG).exists() and _has_torn_tail(d / COMMIT_LOG)
    ):
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
