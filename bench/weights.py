"""Weight push benchmark on loopback: the streamed HTTP push against the wire and memory limits.

    .venv/bin/python bench/weights.py                          # 16 x 64 MiB fp32 (~1 GiB), 3 repeats
    .venv/bin/python bench/weights.py --tensors 32 --mib 32 --bucket-mib 16 --servers 2

Measured on the same bytes (`--tensors` tensors of `--mib` MiB of `--dtype`), best of `--repeats`:

(a) streamed HTTP push, end to end: `services.rollout.client.push_weights_stream` (what
    `trainer.weight_sync.WeightSync.push` runs: header from the specs, buckets of `--bucket-mib` fanned out
    from one pass over the tensors) to `--servers` real rollout servers, each a separate process running the
    service's own app (`build_app`: uvicorn, BodyLimit, the PUT route, weights_stream's incremental parser,
    `RolloutEngine.put_received`'s validation and swap) around a model-less engine whose schema is these
    tensors ("hf-less": its install rebinds a dict, so the time is the transport and the parse). Until the
    response, with the sha256 after the swap (`wait_sha256=false`); the hash's own time is reported too.
(b) collective (gloo) broadcast to 1 and 2 replicas: `bench_collective` below, filled in by the collective
    weight path (services/rollout/collective*.py, trainer/weight_broadcast.py).
(c) raw loopback TCP: a plain socket sender (`sendall` of the tensors' memory) and a receiver process
    (`recv_into` one preallocated buffer): the ceiling for any protocol over this socket.
(d) memcpy of the same bytes (one thread, into preallocated buffers): the ceiling for any copy.

Prints the ratios (a)/(c) (target >= 0.5) and (a)/(d), the sha256 throughput (why hashing is off the hot
path), and the seconds 8 GB would take over NCCL at stated bandwidths (arithmetic, not measured). Writes
the same text to bench/results/weights.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "proto")]

from services.rollout.client import RolloutClient, push_weights_stream  # noqa: E402
from services.rollout.engine import RolloutEngine, StagedWeights, WeightSchema, state_sha256  # noqa: E402
from services.rollout.protocol import Sample  # noqa: E402
from services.rollout.weights_stream import NamedSpec  # noqa: E402

RESULTS = REPO / "bench" / "results"
TOKEN = "bench-weights-token"
MiB, GB = 1 << 20, 1e9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Stated NCCL bandwidths for the projection (bus bandwidth a large broadcast reaches; not measured here).
NCCL_GBPS = {
    "NVLink, 8x H100 in one node (~150 GB/s broadcast algbw)": 150.0,
    "InfiniBand NDR 400 Gb/s, one NIC per GPU (~40 GB/s)": 40.0,
    "RoCE/IB 100 Gb/s (~11 GB/s)": 11.0,
}


@dataclass
class Result:
    label: str
    seconds: float
    nbytes: int
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / GB


def make_specs(args: argparse.Namespace) -> list[NamedSpec]:
    dtype = DTYPES[args.dtype]
    numel = args.mib * MiB // dtype.itemsize
    return [(f"layers.{i}.weight", (numel // 1024, 1024), dtype) for i in range(args.tensors)]


def make_tensors(specs: list[NamedSpec]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape, dtype in specs}


# ---------------------------------------------------------------------------------------------------------
# (a) the streamed HTTP push to real rollout servers around a model-less engine


class NullEngine(RolloutEngine):
    """A rollout engine without a model: the schema of the benchmark's tensors; an install rebinds a dict."""

    backend = "null"

    def __init__(self, specs: list[NamedSpec]) -> None:
        schema = WeightSchema({name: (tuple(shape), dtype) for name, shape, dtype in specs})
        super().__init__(
            tokenizer=None,
            schema=schema,
            sha256="",
            version=0,
            vocab_size=1,
            max_model_len=1,
            eos_token_ids=[],
            seed=0,
        )
        self.weights: dict[str, torch.Tensor] = {}

    def _prepare(self, staged: StagedWeights) -> None:
        pass  # the received tensors are owned CPU buffers already: serve them as they are

    async def _install(self, staged: StagedWeights) -> None:
        self.weights = staged.tensors

    async def _generate(self, prompt_ids, params) -> list[Sample]:  # type: ignore[no-untyped-def]
        raise NotImplementedError("the benchmark engine does not generate")

    async def close(self) -> None:
        self.weights = {}


def serve_null(args: argparse.Namespace) -> None:
    """`--serve PORT`: the rollout service's app around a NullEngine, in this process (uvicorn's defaults)."""
    import uvicorn

    from services.rollout.app import build_app
    from services.rollout.config import RolloutConfig

    cfg = RolloutConfig(model="null", port=args.serve, token=TOKEN, max_weights_bytes=1 << 40)
    app = build_app(cfg, engine=NullEngine(make_specs(args)))
    uvicorn.run(app, host="127.0.0.1", port=args.serve, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def null_server_procs(
    args: argparse.Namespace, n: int
) -> Iterator[tuple[list[RolloutClient], list[subprocess.Popen]]]:
    ports = [free_port() for _ in range(n)]
    argv = [sys.executable, __file__, "--tensors", str(args.tensors), "--mib", str(args.mib)]
    argv += ["--dtype", args.dtype]
    procs = [subprocess.Popen([*argv, "--serve", str(p)]) for p in ports]
    clients = [RolloutClient(f"http://127.0.0.1:{p}", token=TOKEN, timeout_s=600) for p in ports]
    try:
        for c in clients:
            c.wait_ready(120)
        yield clients, procs
    finally:
        for c in clients:
            c.close()
        for p in procs:
            p.terminate()
            p.wait(30)


@contextlib.contextmanager
def null_servers(args: argparse.Namespace, n: int) -> Iterator[list[RolloutClient]]:
    with null_server_procs(args, n) as (clients, _):
        yield clients


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process (all its threads) or of process `pid` (Linux /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_http(args: argparse.Namespace, specs, tensors, total: int) -> tuple[Result, Result]:
    """(a): best end-to-end push (response after the swap) and the sha256 that follows it on the server,
    after one warm-up push (a long-running server reuses memory it has touched; a fresh process pays
    first-touch costs, several times the copy on a VM). The notes give the CPU seconds per GB of each side
    in the best push (robust to other load on the machine, unlike the wall time)."""
    best = hashed = float("inf")
    note = ""
    with null_server_procs(args, args.servers) as (clients, procs):
        for version in range(1, args.repeats + 2):
            cpu0 = [cpu_seconds(), *(cpu_seconds(p.pid) for p in procs)]
            t0 = time.perf_counter()
            results = push_weights_stream(
                clients, specs, iter(tensors.items()), version, bucket_bytes=args.bucket_mib * MiB
            )
            t_push = time.perf_counter() - t0
            cpu1 = [cpu_seconds(), *(cpu_seconds(p.pid) for p in procs)]
            for r in results:
                if isinstance(r, Exception):
                    raise r
            infos = [c.weights() for c in clients]  # waits for the hash computed after the swap
            t_hash = time.perf_counter() - t0
            assert all(i.version == version and i.sha256 for i in infos)
            if version > 1 and t_push < best:
                gb = total / GB
                client, server = (
                    cpu1[0] - cpu0[0],
                    max(b - a for a, b in zip(cpu0[1:], cpu1[1:], strict=True)),
                )
                note = f"cpu-s/GB: client {client / gb:.2f}, server {server / gb:.2f}"
            if version > 1:
                best, hashed = min(best, t_push), min(hashed, t_hash)
        expected = state_sha256(tensors, tensors)
        assert all(c.weights().sha256 == expected for c in clients), (
            "served weights differ from the sent ones"
        )
    fan = f" to {args.servers} servers" if args.servers > 1 else ""
    label = f"(a) streamed HTTP push{fan}"
    return (
        Result(label, best, total, note),
        Result("(a') ... until its sha256 is known", hashed, total, "hash after the swap, on the server"),
    )


# ---------------------------------------------------------------------------------------------------------
# (b) collective broadcast: the collective weight path adds it here


def _collective_receiver(port: int, world: int, rank: int, specs, bucket_bytes: int, repeats: int) -> None:
    """One replica of (b), in its own process: join the group, receive every repeat into fresh memory."""
    from services.rollout.collective import Group, plan_buckets

    group = Group.join("127.0.0.1", port, world, rank, "gloo", "bench", timeout_s=300)
    plan = plan_buckets(specs, bucket_bytes)
    for r in range(repeats):
        received = group.receive(plan)
        assert len(received) == len(specs)
        del received
        group.store.set(f"done/{r}/{rank}", "1")
    group.store.wait(["finished"])
    group.close()


def bench_collective(args: argparse.Namespace, specs, tensors, total: int, replicas: int) -> Result | None:
    """(b) gloo broadcast of the same tensors to `replicas` receivers (1 and 2), each a separate process:
    `services.rollout.collective.Group.send` on this side (rank 0, the trainer's side) and `Group.receive` on
    theirs (what a replica runs; pipelined chain, buckets of `--bucket-mib`), timed until every replica has
    every byte in fresh memory. The group's data path alone: no HTTP, no validation, no hash, no swap."""
    from services.rollout.collective import Group, host_store, plan_buckets

    bucket_bytes = args.bucket_mib * MiB
    store = host_store("127.0.0.1", 0, 300)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_collective_receiver,
            args=(store.port, replicas + 1, rank, specs, bucket_bytes, args.repeats),
            daemon=True,
        )
        for rank in range(1, replicas + 1)
    ]
    for proc in procs:
        proc.start()
    group = Group(store, "bench", 0, replicas + 1, "gloo", timeout_s=300, local_addr="127.0.0.1")
    plan = plan_buckets(specs, bucket_bytes)
    best = float("inf")
    try:
        for r in range(args.repeats):
            t0 = time.perf_counter()
            group.send(plan, iter(tensors.items()))
            group.store.wait([f"done/{r}/{rank}" for rank in range(1, replicas + 1)])
            best = min(best, time.perf_counter() - t0)
    finally:
        group.store.set("finished", "1")
        for proc in procs:
            proc.join(60)
        group.close()
    return Result(
        f"(b) gloo broadcast to {replicas} replica(s)", best, total, "collective.Group, separate processes"
    )


def bench_collective_push(args: argparse.Namespace, specs, tensors, total: int, replicas: int) -> Result:
    """(b') the whole collective push (trainer.weight_broadcast.CollectiveSync.push) to `replicas` real rollout
    servers around the model-less engine: the HTTP handshake, the broadcast, then each server's
    `put_tensors` (validation, the sha256 of everything received, the swap). Best of --repeats, after a first
    push that forms the group."""
    from trainer.weight_broadcast import CollectiveSync
    from trainer.weight_sync import StateDictWeights

    class NoRedis:  # the push sets the policy version in Redis: not measured here
        def set(self, *args: object) -> None:
            pass

    best = float("inf")
    with null_servers(args, replicas) as clients:
        urls = [str(c._http.base_url) for c in clients]
        sync = CollectiveSync(
            NoRedis(),  # type: ignore[arg-type]
            "bench",
            urls,
            token=TOKEN,
            timeout_s=600,
            addr="127.0.0.1",
            collective_timeout_s=300,
            bucket_bytes=args.bucket_mib * MiB,
        )
        try:
            for version in range(1, args.repeats + 2):
                seconds = sync.push(StateDictWeights(tensors), version)
                if version > 1:
                    best = min(best, seconds)
            expected = state_sha256(tensors, tensors)
            assert all(c.weights().sha256 == expected for c in clients), "served weights differ"
        finally:
            sync.close()
    return Result(
        f"(b') collective push to {replicas} server(s)", best, total, "+ handshake, sha256, swap (verified)"
    )


# ---------------------------------------------------------------------------------------------------------
# (c) raw loopback TCP and (d) memcpy


def _tcp_receiver(port_queue, nbytes: int, repeats: int) -> None:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        for _ in range(repeats):
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], min(nbytes - got, 64 * MiB))
                    if n == 0:
                        raise RuntimeError("sender closed early")
                    got += n
                conn.sendall(b"k")  # the whole body is in: the sender stops its clock


def bench_tcp(args: argparse.Namespace, tensors: dict[str, torch.Tensor], total: int) -> Result:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_tcp_receiver, args=(ports, total, args.repeats), daemon=True)
    proc.start()
    port = ports.get(timeout=60)
    views = [t.reshape(-1).view(torch.uint8).numpy().data for t in tensors.values()]
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for v in views:
                sock.sendall(v)
            assert sock.recv(1) == b"k"
        best = min(best, time.perf_counter() - t0)
    proc.join(60)
    return Result("(c) raw loopback TCP", best, total, "sendall -> recv_into, two processes")


def bench_memcpy(args: argparse.Namespace, tensors: dict[str, torch.Tensor], total: int) -> Result:
    import numpy as np

    src = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values()]
    dst = [np.empty_like(s) for s in src]
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            np.copyto(d, s)
        best = min(best, time.perf_counter() - t0)
    return Result("(d) memcpy", best, total, "numpy copyto, one thread")


def bench_sha256(tensors: dict[str, torch.Tensor], total: int) -> Result:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for t in tensors.values():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return Result("sha256 of the same bytes", time.perf_counter() - t0, total, "why it is off the hot path")


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--mib", type=int, default=64, help="MiB per tensor")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--bucket-mib", type=int, default=64, help="push bucket size (MiB)")
    p.add_argument("--servers", type=int, default=1, help="receivers of the HTTP push (one pass, fanned out)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)  # internal: run one receiver
    p.add_argument("--out", default=str(RESULTS / "weights.txt"))
    args = p.parse_args(argv)
    if args.serve:
        serve_null(args)
        return 0

    console = Console(width=120, record=True)
    specs = make_specs(args)
    tensors = make_tensors(specs)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    console.print(
        f"[bold]weights[/]: {args.tensors} x {args.mib} MiB {args.dtype} = {total / GB:.2f} GB; "
        f"bucket {args.bucket_mib} MiB; best of {args.repeats}; {os.cpu_count()} CPUs; torch {torch.__version__}"
    )
    memcpy, tcp = bench_memcpy(args, tensors, total), bench_tcp(args, tensors, total)
    http, hashed = bench_http(args, specs, tensors, total)
    collective = [bench_collective(args, specs, tensors, total, n) for n in (1, 2)]
    collective += [bench_collective_push(args, specs, tensors, total, n) for n in (1, 2)]
    sha = bench_sha256(tensors, total)
    rows = [http, hashed, *[c for c in collective if c is not None], tcp, memcpy, sha]

    table = Table(title="weight push on loopback")
    for col in ("path", "seconds", "GB/s", "note"):
        table.add_column(col, justify="right" if col in ("seconds", "GB/s") else "left")
    for r in rows:
        table.add_row(r.label, f"{r.seconds:.3f}", f"{r.gbps:.2f}", r.note)
    if all(c is None for c in collective):
        table.add_row("(b) gloo broadcast (1, 2 replicas)", "-", "-", "not measured yet: bench_collective()")
    console.print(table)
    ratio_c, ratio_d = http.gbps / tcp.gbps, http.gbps / memcpy.gbps
    verdict = "meets" if ratio_c >= 0.5 else "misses"
    console.print(f"(a)/(c) = {ratio_c:.2f} ({verdict} the 0.5 target); (a)/(d) = {ratio_d:.2f}")
    if collective[0] is not None and collective[1] is not None:
        fan = collective[1].seconds / collective[0].seconds
        console.print(
            f"(b) 2 replicas / 1 replica = {fan:.2f} ({'meets' if fan <= 1.2 else 'misses'} the 1.2 target; "
            f"{os.cpu_count()} CPUs: on loopback every hop's copies share them); (b') 2 / 1 = "
            f"{collective[3].seconds / collective[2].seconds:.2f}"  # type: ignore[union-attr]
        )
    console.print(
        f"sha256 at {sha.gbps:.2f} GB/s would add {total / GB / sha.gbps:.2f} s per push if it ran before the "
        f"swap; it runs after it ({hashed.seconds - http.seconds:.2f} s later here)"
    )
    console.print("[bold]8 GB over NCCL[/] (projection: 8 GB / bandwidth, latency and setup not counted):")
    for name, gbps in NCCL_GBPS.items():
        console.print(f"  {name}: {8 / gbps:.2f} s")
    console.print(f"  for comparison, this HTTP push at {http.gbps:.2f} GB/s: {8 / http.gbps:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(console.export_text())
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
