"""Data parallelism for `torchrun --nproc-per-node N opd train ...` (gloo on CPU, NCCL on CUDA).

Design: rank 0 is the only Redis consumer. It reads a batch, drops stale and bad records, and broadcasts the
kept records' raw protobuf bytes (never pickles); every rank decodes the same records, splits each
mini-batch into N contiguous shards and trains on its own shard. A shard's loss is its token sum divided by
the *global* token count of the mini-batch, and gradients are all-reduced with SUM, so the update equals the
single-process update on the whole mini-batch (up to float summation order). Parameters start equal
(broadcast from rank 0) and every rank applies the same reduced gradient, so they stay equal.

With `parallelism = "fsdp"` (trainer/parallel.py) FSDP2 reduce-scatters the gradients during backward
instead, with the same SUM semantics; everything else here (one consumer, broadcast records, token-count
denominators) is shared by both layouts.

Why not the DDP wrapper: the loss reaches the LM-head weight through trainer/heads.py, outside
`module.forward`, which DDP's reducer does not see; an explicit coalesced all-reduce after backward has
DDP's semantics without that coupling. One consumer per run also keeps the exactly-once bookkeeping
(trainer/checkpoint.py) in a single commit log.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from services.common.devices import resolve_device

# Coalesce gradients into buckets of about this many bytes per all-reduce (DDP's default is 25 MiB).
_BUCKET_BYTES = 25 << 20


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.enabled and dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device_name: str, *, always_group: bool = False) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process.

    `always_group` makes a one-rank group for a single process (FSDP2 needs a device mesh even on one rank).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if (world > 1 or always_group) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world > 1:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(rank=rank, world_size=world, device=device)


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for background checkpoint writes (trainer/checkpoint.py), or None without
    a process group. Its own group: the writer thread's collectives must not interleave with training's."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def shutdown(ctx: DistContext, *, clean: bool = True) -> None:
    """Leave the process group. On a clean exit every rank first meets at a barrier, so no rank tears its
    gloo pairs down while a peer still reads from them, and the objects that hold the groups (FSDP2 device
    meshes) are collected before the groups go; a rank that leaves on an error skips the barrier."""
    if not dist.is_initialized():
        return
    gc.collect()
    if clean and ctx.enabled:
        dist.barrier()
    dist.destroy_process_group()


def broadcast_parameters(ctx: DistContext, model: nn.Module) -> None:
    """Make every rank's parameters and buffers equal to rank 0's."""
    if not ctx.enabled:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        buf = t.data.to(ctx.comm_device)
        dist.broadcast(buf, src=0)
        t.data.copy_(buf)


def broadcast_flag(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's flag on every rank."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=ctx.comm_device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_blobs(ctx: DistContext, blobs: list[bytes] | None) -> list[bytes] | None:
    """Rank 0's list of byte strings (or None, meaning "stop") on every rank; raw bytes, no pickling."""
    if not ctx.enabled:
        return blobs
    dev = ctx.comm_device
    header = torch.zeros(2, dtype=torch.int64, device=dev)
    if ctx.is_main:
        header[0] = -1 if blobs is None else len(blobs)
        header[1] = 0 if blobs is None else sum(len(b) for b in blobs)
    dist.broadcast(header, src=0)
    n, total = int(header[0]), int(header[1])
    if n < 0:
        return None
    lengths = torch.zeros(n, dtype=torch.int64, device=dev)
    data = torch.zeros(total, dtype=torch.uint8, device=dev)
    if ctx.is_main and blobs is not None:  # on rank 0, n >= 0 means blobs is a list
        lengths.copy_(torch.tensor([len(b) for b in blobs], dtype=torch.int64))
        if total:
            data.copy_(torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8))
    dist.broadcast(lengths, src=0)
    dist.broadcast(data, src=0)
    raw = data.cpu().numpy().tobytes()
    out, pos = [], 0
    for n_bytes in lengths.tolist():
        out.append(raw[pos : pos + n_bytes])
        pos += n_bytes
    return out


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Elementwise sum of a list of floats over ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(ctx: DistContext, values: list[float]) -> list[float]:
    """Elementwise max of a list of floats over ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_gradients(ctx: DistContext, model: nn.Module) -> None:
    """Sum every parameter's gradient over ranks (a missing gradient counts as zero), in coalesced buckets."""
    if not ctx.enabled:
        return
    grads: list[torch.Tensor] = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= _BUCKET_BYTES:
            _reduce_bucket(ctx, bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(ctx, bucket)


def _reduce_bucket(ctx: DistContext, grads: list[torch.Tensor]) -> None:
    flat = _flatten_dense_tensors(grads).to(ctx.comm_device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(reduced)


def reduce_metrics(ctx: DistContext, metrics: dict[str, float], weight: float) -> dict[str, float]:
    """Weighted mean of each metric over ranks (weight = the rank's token count); keys must match."""
    if not ctx.enabled:
        return dict(metrics)
    keys = sorted(metrics)
    sums = all_reduce_sum(ctx, [metrics[k] * weight for k in keys] + [weight])
    total = sums[-1]
    return {k: (v / total if total else 0.0) for k, v in zip(keys, sums[:-1], strict=True)}
