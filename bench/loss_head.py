"""LSM loss forward + backward through trainer.heads vs the naive full-logit path: peak memory and time.

    python bench/loss_head.py [--device cpu|cuda] [--V 32000 --d 512 --T 4096 --K 32 --chunk 1024]

Paths (each measured in its own subprocess, so one path's allocator high-water mark cannot hide another's):

    naive_lsm      logits = h @ W.T (T, V) -> log_softmax -> gather K -> local_support_kl (renormalised)
    heads_lsm      support_logits(h, W, ids) (T, K) -> local_support_kl (renormalised); no (T, V) tensor
    naive_logprob  log_softmax(h @ W.T) gathered at the sampled token (sampled-token objective's log pi)
    heads_logprob  token_logprobs(h, W, y): chunked logsumexp, recomputed in backward

Both LSM paths feed the same loss function (trainer.losses.local_support_kl) on the same inputs: h [T, d]
and W [V, d] both require grad (the LM head is trained), teacher log-probabilities random, support ids
random and distinct per row. The printed loss values must agree.

Peak memory is the growth over a baseline taken after the inputs exist and after a tiny run of the same
path (one-time library set-up is not memory of the loss): on CPU the process's peak RSS (ru_maxrss) minus
its value before the first full-size run; on CUDA torch.cuda.max_memory_allocated minus memory_allocated.
Both paths hold the same grad buffers for h and W (the W grad, V * d, is most of the heads path's peak).
Time is the median of `--repeats` runs after one full-size warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.heads import support_logits, token_logprobs  # noqa: E402
from trainer.losses import local_support_kl  # noqa: E402

PATHS = ("naive_lsm", "heads_lsm", "naive_logprob", "heads_logprob")


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs built chunk by chunk, so building them never raises the memory high-water mark."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    T, V, d, K = args.T, args.V, args.d, args.K
    hidden_Td = torch.randn(T, d, generator=g)
    weight_Vd = torch.randn(V, d, generator=g) * d**-0.5
    # distinct ids per row: top-K of uniform noise, 256 rows at a time (a full (T, V) draw would be 0.5 GB)
    ids_TK = torch.cat(
        [torch.rand(min(256, T - s), V, generator=g).topk(K).indices for s in range(0, T, 256)]
    )
    teacher_TK = torch.log_softmax(torch.randn(T, K, generator=g) * 2, dim=-1) - 0.1  # top-K mass < 1
    sampled_T = torch.randint(0, V, (T,), generator=g)
    return dict(
        hidden_Td=hidden_Td.to(device, dtype).requires_grad_(),
        weight_Vd=weight_Vd.to(device, dtype).requires_grad_(),
        ids_TK=ids_TK.to(device),
        teacher_TK=teacher_TK.to(device),
        mask_TK=torch.ones(T, K, dtype=torch.bool, device=device),
        sampled_T=sampled_T.to(device),
    )


def loss_fn(path: str, x: dict, chunk: int) -> torch.Tensor:
    h, w = x["hidden_Td"], x["weight_Vd"]
    if path == "naive_lsm":
        logp_TV = torch.log_softmax((h @ w.T).float(), dim=-1)  # (T, V)
        student_TK = logp_TV.gather(-1, x["ids_TK"])
    elif path == "heads_lsm":
        student_TK = support_logits(h, w, x["ids_TK"], chunk_size=chunk)  # (T, K), log pi up to a shift
    elif path == "naive_logprob":
        logp_TV = torch.log_softmax((h @ w.T).float(), dim=-1)  # (T, V)
        return logp_TV.gather(-1, x["sampled_T"][:, None]).mean()
    elif path == "heads_logprob":
        return token_logprobs(h, w, x["sampled_T"], chunk_size=chunk).mean()
    else:
        raise ValueError(path)
    kl_1T = local_support_kl(student_TK[None], x["teacher_TK"][None], x["mask_TK"][None], True)
    return kl_1T.mean()


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> None:
    """One path in this process; prints one JSON line."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # A tiny run of the same path first: one-time library set-up (thread pools, kernel caches, cuBLAS
    # workspace) is not memory of the loss, and would otherwise land in whichever path runs it first.
    tiny = argparse.Namespace(T=64, V=min(args.V, 512), d=args.d, K=min(args.K, 16), seed=args.seed)
    loss_fn(args.worker, make_inputs(tiny, device, dtype), chunk=16).backward()
    x = make_inputs(args, device, dtype)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = peak_rss_bytes()
    times, losses = [], []
    for _ in range(1 + args.repeats):
        x["hidden_Td"].grad = x["weight_Vd"].grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(args.worker, x, args.chunk)
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()) - base
    grad_norm = torch.cat([x["hidden_Td"].grad.flatten(), x["weight_Vd"].grad.flatten()]).float().norm()
    print(
        json.dumps(
            dict(
                path=args.worker,
                peak_bytes=peak,
                times=times[1:],
                loss=losses[-1],
                grad_norm=grad_norm.item(),
                threads=torch.get_num_threads(),
            )
        )
    )


def run_path(path: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", path], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio_line(name: str, naive: float, heads: float, target: float | None) -> str:
    r = naive / heads
    if target is None:
        return f"{name} ratio naive/heads = {r:.1f}"
    return f"{name} ratio naive/heads = {r:.1f} (target >= {target:g}) {'met' if r >= target else 'NOT MET'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    paths = [s for s in args.paths.split(",") if s]
    if unknown := set(paths) - set(PATHS):
        p.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    passthrough = list(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    results = {path: run_path(path, passthrough) for path in paths}
    load_after = os.getloadavg()

    threads = next(iter(results.values()))["threads"]
    print(
        f"loss head benchmark: V={args.V} d={args.d} T={args.T} K={args.K} chunk={args.chunk} "
        f"dtype={args.dtype} device={args.device} torch threads={threads} cpus={os.cpu_count()}"
    )
    print(
        f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    mem_kind = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(
        f"{'path':<15}{'fwd+bwd median s':>18}{'runs s':>26}{mem_kind + ' MiB':>28}{'loss':>14}{'|grad|':>12}"
    )
    for path, r in results.items():
        runs = " ".join(f"{t:.3f}" for t in r["times"])
        print(
            f"{path:<15}{statistics.median(r['times']):>18.3f}{runs:>26}{r['peak_bytes'] / 2**20:>28.1f}"
            f"{r['loss']:>14.6f}{r['grad_norm']:>12.5f}"
        )
    # The targets are for LSM; log pi(y_t) still needs all V logits (chunked), so no speed-up is due.
    for kind, mem_target, speed_target in (("lsm", 5, 3), ("logprob", None, None)):
        naive, heads = results.get(f"naive_{kind}"), results.get(f"heads_{kind}")
        if naive is None or heads is None:
            continue
        print(f"[{kind}]")
        print(ratio_line("peak memory", naive["peak_bytes"], max(heads["peak_bytes"], 1), mem_target))
        t_naive, t_heads = statistics.median(naive["times"]), statistics.median(heads["times"])
        print(ratio_line("speed", t_naive, t_heads, speed_target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
