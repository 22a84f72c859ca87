"""Rollout service benchmark: generation tokens/s of the hf and vllm backends, and weight push time.

    .venv/bin/python bench/rollout.py                       # both backends, then a ~100 MB push (hf)
    .venv/bin/python bench/rollout.py --backends hf --push-backends hf,vllm

1. Throughput: the same tiny model and prompts on each backend, through the real HTTP service
   (`--prompts` x `--n` samples x `--new-tokens`, no stop tokens so every sample has the full length);
   one warm-up request, then the best of `--repeats`.
2. Weight push: a ~25M-parameter fp32 Llama (~100 MB), `RolloutClient.put_weights(state_dict)` end to end
   over loopback: streamed safetensors encoding, HTTP, parse, validation, hash, swap (median of
   `--repeats`; target: under 1 s). Also `put_weights(bytes)` timed with the serialisation before it
   (what a trainer pushing one body to several servers does), and the server's own share (from its
   `opd_rollout_weight_update_seconds` histogram: parse, validate, hash, device copy, swap).

Both servers run as `python -m launcher.cli rollout serve --backend ...` subprocesses (vLLM spawns
processes; and a trainer pushing weights is a separate process too).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "proto")]

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama, save_model, tiny_llama_config  # noqa: E402
from services.rollout.client import RolloutClient, state_dict_to_safetensors  # noqa: E402
from services.rollout.protocol import GenerateRequest  # noqa: E402

console = Console(width=120)
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(backend: str, model: Path, extra: list[str], log_dir: Path):
    """`opd rollout serve` for `model` as a subprocess (as deployed: trainer and server are separate processes)."""
    port = free_port()
    cmd = [sys.executable, "-m", "launcher.cli", "rollout", "serve", "--backend", backend, "--model", str(model),
           "--port", str(port), "--dtype", "float32", "--max-batch-size", "256", "--log-level", "warning",
           *extra]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ, "OPD_WEIGHTS_TOKEN": TOKEN}
    log_path = log_dir / f"{backend}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = RolloutClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=600)
    try:
        deadline = time.monotonic() + 600
        while not client.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{backend} server did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def server_swap_seconds(client: RolloutClient) -> tuple[float, float]:
    """(sum, count) of the server's weight-update histogram: parse + validate + hash + swap."""
    text = client._http.get("/metrics").text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    return values["opd_rollout_weight_update_seconds_sum"], values["opd_rollout_weight_update_seconds_count"]


def throughput(client: RolloutClient, args, prompts: list[list[int]]) -> tuple[float, float]:
    """Best tokens/s over the repeats, and that request's seconds."""
    req = GenerateRequest(
        prompts=prompts, n=args.n, max_new_tokens=args.new_tokens, top_p=0.9, seed=0, stop_token_ids=[]
    )
    client.generate(req)  # warm-up: first-call allocations, kernel selection
    best = (0.0, 0.0)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        resp = client.generate(req)
        seconds = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for s in resp.samples)
        assert tokens == len(prompts) * args.n * args.new_tokens
        best = max(best, (tokens / seconds, seconds))
    return best


def make_push_model(path: Path) -> int:
    """~25M fp32 parameters (~100 MB): hidden 512, 6 layers, vocab 4096."""
    tok = build_char_tokenizer()
    config = tiny_llama_config(
        4096, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1536, tokenizer=tok
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_model(model, tok, path)
    return sum(p.numel() for p in model.parameters())


def push_times(client: RolloutClient, state_dict: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median seconds of `put_weights(state_dict)` (streamed) and of serialise-then-`put_weights(bytes)`."""
    streamed, pre, server = [], [], []
    version = client.weights().version
    for _ in range(repeats):
        before = server_swap_seconds(client)
        t0 = time.perf_counter()
        client.put_weights(state_dict, version := version + 1)
        streamed.append(time.perf_counter() - t0)
        after = server_swap_seconds(client)
        assert after[1] == before[1] + 1
        server.append(after[0] - before[0])
        t0 = time.perf_counter()
        client.put_weights(state_dict_to_safetensors(state_dict), version := version + 1)
        pre.append(time.perf_counter() - t0)
    return {
        "streamed_s": statistics.median(streamed),
        "best_s": min(streamed),
        "bytes_s": statistics.median(pre),
        "server_s": statistics.median(server),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="hf,vllm", help="throughput backends, comma-separated")
    p.add_argument("--push-backends", default="hf", help="weight-push backends, comma-separated ('' = none)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm-eager", action="store_true", help="vllm without torch.compile (starts faster)")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    push_backends = [b for b in args.push_backends.split(",") if b]
    extra = ["--vllm-gpu-memory-utilization", "0.1"] + (["--vllm-enforce-eager"] if args.vllm_eager else [])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny_llama(root / "tiny", seed=0)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(5, 85, (args.prompts, args.prompt_len), generator=g).tolist()
        rates: dict[str, tuple[float, float]] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("throughput", total=len(backends))
            for backend in backends:
                progress.update(task, description=f"throughput: {backend} (start + {args.repeats} runs)")
                with serve(backend, tiny, extra, root) as client:
                    rates[backend] = throughput(client, args, prompts)
                progress.advance(task)

        if rates:
            table = Table(
                title=f"generation: {args.prompts} prompts x n={args.n} x {args.new_tokens} new tokens"
            )
            for col in ("backend", "tokens/s", "request s", "vs hf"):
                table.add_column(col)
            for backend, (rate, seconds) in rates.items():
                ratio = f"{rate / rates['hf'][0]:.2f}x" if "hf" in rates else "-"
                table.add_row(backend, f"{rate:,.0f}", f"{seconds:.2f}", ratio)
            console.print(table)

        if push_backends:
            big = root / "push"
            n_params = make_push_model(big)
            from safetensors.torch import load_file

            state_dict = load_file(big / "model.safetensors")
            table = Table(title=f"weight push: {n_params / 1e6:.1f}M fp32 parameters over loopback")
            cols = (
                "backend",
                "MB",
                "server s",
                "put(state_dict) s",
                "best s",
                "put(bytes) s",
                "target < 1 s",
            )
            for col in cols:
                table.add_column(col)
            mb = len(state_dict_to_safetensors(state_dict)) / 1e6
            for backend in push_backends:
                with serve(backend, big, extra, root) as client:
                    t = push_times(client, state_dict, args.repeats)
                table.add_row(
                    backend,
                    f"{mb:.1f}",
                    f"{t['server_s']:.3f}",
                    f"{t['streamed_s']:.3f}",
                    f"{t['best_s']:.3f}",
                    f"{t['bytes_s']:.3f}",
                    "yes" if t["streamed_s"] < 1.0 else "NO",
                )
            console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
