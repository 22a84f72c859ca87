"""The collective weight path (issue #16): a torch.distributed group between the trainer and the replicas.

One HTTP control plane (collective_api.py) and one data plane (this module). The trainer hosts a TCPStore
on its configured address and is rank 0 of a group whose ranks 1..N are the rollout replicas; each push then
moves every tensor once out of the trainer, whatever the number of replicas:

    gloo (CPU)   a pipelined chain: rank 0 sends each piece (`chunk_bytes`) of a bucket to rank 1, rank r
                 forwards each piece to rank r+1 as soon as it has it, so the trainer's link carries the
                 weights once and N replicas take about as long as one (plus one piece per hop)
    nccl (GPU)   NCCL's own broadcast (a pipelined ring), same buckets

Tensors travel as raw bytes in flat `uint8` buckets of about `bucket_bytes` (tensors packed in send order,
each at a 64-byte-aligned offset; a tensor larger than a bucket travels alone, without a copy), so a model
of hundreds of small tensors costs a few large transfers. Both sides derive the same bucket plan from the
same specs (`plan_buckets`), so nothing but bytes crosses the group.

The groups never touch torch.distributed's global state (no `init_process_group`, no default group): the
backend object (`ProcessGroupGloo` / `ProcessGroupNCCL`) is built on a `PrefixStore` named after the group and
used directly, so it cannot collide with the trainer's own data-parallel group or with vLLM's.

Light on purpose (torch only): the vLLM worker extension imports it inside vLLM's worker processes.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
ALIGN = 64  # bytes: every tensor of a bucket starts here, so a byte slice views as any dtype
DEFAULT_BUCKET_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 4 << 20  # gloo chain piece: small enough to pipeline, large enough to amortise a send
_POLL_S = 0.0005

# dtype names on the wire (the safetensors-style spelling torch prints without its prefix)
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}

WireSpec = tuple[str, tuple[int, ...], torch.dtype]
Abort = Callable[[], str | None]  # returns a reason to stop waiting (a peer's request failed), else None


class CollectiveError(RuntimeError):
    """A collective transfer failed (a peer died or stopped, a timeout): the group is unusable now."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (one of {sorted(DTYPES)})") from None


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


# ---------------------------------------------------------------------------------------------------------
# The bucket plan: the same on both sides


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes into the bucket
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    slots: tuple[Slot, ...]

    @property
    def alone(self) -> bool:
        """One tensor filling the bucket exactly: sent from (and received into) the tensor's own memory."""
        return len(self.slots) == 1 and self.slots[0].nbytes == self.nbytes


def plan_buckets(specs: Iterable[WireSpec], bucket_bytes: int) -> list[Bucket]:
    """Pack tensors in send order into buckets of at most `bucket_bytes` (a larger tensor gets its own).
    Empty tensors take no bytes and ride in whichever bucket is open."""
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    used = 0

    def flush() -> None:
        nonlocal slots, used
        if slots:
            buckets.append(Bucket(used, tuple(slots)))
        slots, used = [], 0

    for name, shape, dtype in specs:
        size = nbytes_of(shape, dtype)
        if size > bucket_bytes:
            flush()
            buckets.append(Bucket(size, (Slot(name, tuple(shape), dtype, 0, size),)))
            continue
        offset = -(-used // ALIGN) * ALIGN
        if offset + size > bucket_bytes:
            flush()
            offset = 0
        slots.append(Slot(name, tuple(shape), dtype, offset, size))
        used = offset + size
    flush()
    return buckets


def plan_digest(buckets: Sequence[Bucket]) -> str:
    """A short fingerprint of a plan (logged on both sides: equal plans, equal digests)."""
    h = hashlib.sha256()
    for b in buckets:
        for s in b.slots:
            h.update(f"{s.name}\0{dtype_name(s.dtype)}\0{list(s.shape)}\0{s.offset}\n".encode())
        h.update(f"|{b.nbytes}\n".encode())
    return h.hexdigest()[:12]


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor as a flat uint8 tensor (no copy); works for bf16 and bool."""
    return t.reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Addresses and stores


def local_address_towards(host: str, port: int = 9) -> str:
    """The local IP address this machine uses to reach `host` (a UDP 'connect' sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def host_store(addr: str, port: int, timeout_s: float) -> TCPStore:
    """The trainer's TCPStore server, listening on `addr:port` only (port 0: any free port; `.port` tells)."""
    listener = socket.create_server((addr, port), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
    bound = listener.getsockname()[1]
    fd = listener.detach()
    try:
        return TCPStore(
            addr,
            bound,
            None,
            True,
            datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    except Exception:
        socket.close(fd)
        raise


class Unreachable(ConnectionError):
    """Nothing accepts connections at the store's address: the join's addr/port are wrong."""


def connect_store(addr: str, port: int, timeout_s: float) -> TCPStore:
    """A client of the trainer's store. A plain TCP connect first (at most 5 s): an address where nothing
    listens fails at once instead of after TCPStore's retries for the whole timeout."""
    try:
        socket.create_connection((addr, port), timeout=min(timeout_s, 5.0)).close()
    except (OSError, UnicodeError, ValueError) as e:
        raise Unreachable(f"cannot reach {addr}:{port}: {e}") from e
    return TCPStore(addr, port, None, False, datetime.timedelta(seconds=timeout_s))


def group_store(store: Store, group_name: str) -> PrefixStore:
    """The group's namespace in the trainer's store (one store serves every group the trainer forms)."""
    return PrefixStore(f"opd-weights/{group_name}/", store)


def update_keys(update_id: str, rank: int) -> tuple[str, str]:
    """Store keys of one update: rank's acceptance ("ok" or "refused: ..."), and the trainer's verdict
    ("go" or "abort: ..."), both under the group's prefix."""
    return f"update/{update_id}/ack/{rank}", f"update/{update_id}/go"


# ---------------------------------------------------------------------------------------------------------
# The group


class Group:
    """One member's side of a weight group: rank 0 (the trainer) sends, ranks 1..N receive.

    Built on `PrefixStore(group_name, store)`; creating it is a rendezvous (every rank must create its side,
    concurrently, within `timeout_s`). Every transfer op also times out after `timeout_s`; after any failure
    the group is unusable (close it; the trainer forms a new one on its next push).
    """

    def __init__(
        self,
        store: Store,
        name: str,
        rank: int,
        world_size: int,
        backend: str,
        *,
        timeout_s: float,
        device: torch.device | None = None,
        local_addr: str | None = None,
        owns_store: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.name, self.rank, self.world_size, self.backend = name, rank, world_size, backend
        self.timeout_s = timeout_s
        self.store: Store = group_store(store, name)
        self._base_store = store if owns_store else None
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            if device is None or device.type != "cuda":
                raise ValueError("backend nccl needs a CUDA device")
            self.device = device  # NCCL runs on the device of the tensors it is given (no set_device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            # the backend objects are used directly (no c10d registration): typed loosely, as their stubs
            # declare send/recv/broadcast on ProcessGroup only
            self._pg: Any = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
        else:
            self.device = torch.device("cpu")
            gloo_opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            gloo_opts._timeout = timeout
            gloo_opts._devices = [ProcessGroupGloo.create_device(hostname=local_addr or "127.0.0.1")]
            self._pg = ProcessGroupGloo(self.store, rank, world_size, gloo_opts)
        self._tag = 0
        # every rank takes part: the group is complete (and NCCL's communicator made) once this returns
        self._broadcast_small()

    @classmethod
    def join(
        cls,
        addr: str,
        port: int,
        world_size: int,
        rank: int,
        backend: str,
        group_name: str,
        *,
        timeout_s: float,
        device: torch.device | None = None,
    ) -> Group:
        """A replica's side: connect to the trainer's store at `addr:port` and take part in the rendezvous."""
        store = connect_store(addr, port, timeout_s)
        return cls(
            store,
            group_name,
            rank,
            world_size,
            backend,
            timeout_s=timeout_s,
            device=device,
            local_addr=local_address_towards(addr, port),
            owns_store=True,
        )

    def _broadcast_small(self) -> None:
        flag = torch.ones(1, dtype=torch.uint8, device=self.device)
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._pg.broadcast([flag], opts).wait()

    def close(self) -> None:
        """Drop the backend (closing its connections, so peers blocked on this rank fail at once)."""
        pg = self.__dict__.pop("_pg", None)
        if pg is not None and self.backend == "nccl":
            pg.abort()  # type: ignore[attr-defined]
        del pg
        self._base_store = None

    @property
    def closed(self) -> bool:
        return "_pg" not in self.__dict__

    # -- one transfer: the same sequence of ops on every rank ----------------------------------------------

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def _pieces(self, buf: torch.Tensor, chunk_bytes: int) -> list[torch.Tensor]:
        return [buf[s : s + chunk_bytes] for s in range(0, buf.numel(), chunk_bytes)]

    def _wait(self, work: dist.Work, abort: Abort | None) -> None:
        """Wait for one op. gloo's send/recv complete only inside `wait` (no polling): a peer that fails
        closes its connections, which fails the op at once; a silent peer fails it at the group timeout.
        NCCL ops are polled, so `abort` (a peer's HTTP request failed) ends the wait early."""
        if self.backend == "gloo":
            work.wait()
            return
        while not work.is_completed():
            reason = abort() if abort is not None else None
            if reason is not None:
                raise CollectiveError(reason)
            time.sleep(_POLL_S)
        work.wait()  # raises the op's error, if any

    def send(
        self,
        buckets: Sequence[Bucket],
        tensors: Iterator[tuple[str, torch.Tensor]],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        abort: Abort | None = None,
    ) -> int:
        """Rank 0: send `tensors` (name, tensor in plan order, read once) to every other rank; returns bytes.

        Two buckets are in flight at most: the next one is filled (from `tensors`, e.g. an FSDP gather)
        while the previous one is on the wire. Raises CollectiveError when a peer fails or `abort` says so.
        """
        assert self.rank == 0
        pool_bytes = max((b.nbytes for b in buckets if not b.alone), default=0)
        spare: list[torch.Tensor] = []  # at most two buffers of pool_bytes, reused bucket after bucket
        in_flight: list[tuple[list[dist.Work], torch.Tensor | None]] = []
        sent = 0
        try:
            for bucket in buckets:
                if len(in_flight) == 2:
                    self._wait_all(in_flight[0][0], abort)
                    pooled = in_flight.pop(0)[1]
                    if pooled is not None:
                        spare.append(pooled)
                if bucket.alone:
                    buf, pooled = self._alone(bucket, tensors), None
                else:
                    pooled = spare.pop() if spare else self._empty(pool_bytes)
                    buf = self._fill(bucket, tensors, pooled)
                in_flight.append((self._post_send(buf, chunk_bytes), pooled))
                sent += bucket.nbytes
            while in_flight:
                self._wait_all(in_flight.pop(0)[0], abort)
        except BaseException as e:
            in_flight.clear()
            self._release(e)
            if isinstance(e, CollectiveError) or not isinstance(e, Exception):
                raise
            raise CollectiveError(f"broadcast to the replicas of group {self.name} failed: {e}") from e
        return sent

    def _wait_all(self, works: list[dist.Work], abort: Abort | None) -> None:
        for work in works:
            self._wait(work, abort)

    @staticmethod
    def _release(error: BaseException) -> None:
        """Drop the pending ops a failed transfer leaves in the frames of its traceback: each holds the
        backend's connections open, and `close` must close them for the peers to fail at once."""
        traceback.clear_frames(error.__traceback__)

    def _empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @staticmethod
    def _next_tensor(tensors: Iterator[tuple[str, torch.Tensor]], slot: Slot) -> torch.Tensor:
        try:
            name, t = next(tensors)
        except StopIteration:
            raise PlanMismatch(f"the weights ended before {slot.name!r}") from None
        if name != slot.name or tuple(t.shape) != slot.shape or t.dtype != slot.dtype:
            raise PlanMismatch(
                f"the weights gave {name!r} {list(t.shape)} {dtype_name(t.dtype)} where their specs "
                f"announced {slot.name!r} {list(slot.shape)} {dtype_name(slot.dtype)}"
            )
        return t.detach()

    def _alone(self, bucket: Bucket, tensors: Iterator[tuple[str, torch.Tensor]]) -> torch.Tensor:
        t = self._next_tensor(tensors, bucket.slots[0])
        return _bytes_view(t.to(self.device).contiguous())

    def _fill(
        self, bucket: Bucket, tensors: Iterator[tuple[str, torch.Tensor]], pooled: torch.Tensor
    ) -> torch.Tensor:
        for slot in bucket.slots:
            t = self._next_tensor(tensors, slot)
            if slot.nbytes:
                pooled[slot.offset : slot.offset + slot.nbytes].copy_(_bytes_view(t.contiguous()))
        return pooled[: bucket.nbytes]

    def _post_send(self, buf: torch.Tensor, chunk_bytes: int) -> list[dist.Work]:
        if self.backend == "nccl":
            return [self._nccl_broadcast(buf)]
        return [self._pg.send([p], 1, self._next_tag()) for p in self._pieces(buf, chunk_bytes)]

    def _nccl_broadcast(self, buf: torch.Tensor) -> dist.Work:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self._pg.broadcast([buf], opts)

    def receive(
        self,
        buckets: Sequence[Bucket],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        abort: Abort | None = None,
    ) -> dict[str, torch.Tensor]:
        """Ranks 1..N: receive every bucket into fresh memory (on this group's device); name -> tensor, each
        a view of its bucket. The next bucket's receives are posted before this one is waited on; on gloo
        each piece is forwarded to the next rank as soon as it has arrived."""
        assert self.rank > 0
        out: dict[str, torch.Tensor] = {}
        forwards: list[dist.Work] = []
        last = self.rank + 1 == self.world_size
        posted: list[tuple[torch.Tensor, list[tuple[torch.Tensor, int, dist.Work]]]] = []
        try:
            if buckets:
                posted.append(self._post_recv(buckets[0], chunk_bytes))
            for i, bucket in enumerate(buckets):
                if i + 1 < len(buckets):
                    posted.append(self._post_recv(buckets[i + 1], chunk_bytes))
                forwards += self._take(posted[0][1], abort, forward=self.backend == "gloo" and not last)
                buf = posted.pop(0)[0]
                for slot in bucket.slots:
                    view = buf[slot.offset : slot.offset + slot.nbytes]
                    out[slot.name] = view.view(slot.dtype).view(slot.shape)
            self._wait_all(forwards, abort)
        except BaseException as e:
            posted.clear()
            forwards.clear()
            self._release(e)
            if isinstance(e, CollectiveError) or not isinstance(e, Exception):
                raise
            raise CollectiveError(f"receive from group {self.name} failed: {e}") from e
        return out

    def _take(
        self, pieces: list[tuple[torch.Tensor, int, dist.Work]], abort: Abort | None, *, forward: bool
    ) -> list[dist.Work]:
        """Wait for a bucket's pieces in order; on gloo, forward each to the next rank once it is in (the
        same tag: this rank's send to r+1 pairs with r+1's receive from r)."""
        sends = []
        for piece, tag, work in pieces:
            self._wait(work, abort)
            if forward:
                sends.append(self._pg.send([piece], self.rank + 1, tag))
        return sends

    def _post_recv(
        self, bucket: Bucket, chunk_bytes: int
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, int, dist.Work]]]:
        if bucket.alone:
            slot = bucket.slots[0]
            buf = _bytes_view(torch.empty(slot.shape, dtype=slot.dtype, device=self.device))
        else:
            buf = self._empty(bucket.nbytes)
        if self.backend == "nccl":
            return buf, [(buf, 0, self._nccl_broadcast(buf))]
        posted = []
        for piece in self._pieces(buf, chunk_bytes):
            tag = self._next_tag()
            posted.append((piece, tag, self._pg.recv([piece], self.rank - 1, tag)))
        return buf, posted


class PlanMismatch(CollectiveError):
    """The trainer's tensors do not follow the specs it announced (a bug on the trainer side)."""
