"""Tokens/s of the whole worker path against the rollout engine alone, at 4,096-token generations (CPU).

    nice -n 10 .venv/bin/python bench/worker_throughput.py               # ~5 min on 2 cores
    .venv/bin/python bench/worker_throughput.py --new-tokens 512 --repeats 1   # a quick look

What the worker adds to generation: teacher scoring, record building and the Redis append. Pipelined per
sample (services/worker/loop.py), those run while other samples still generate, so the worker path should
keep the engine's throughput (target >= 0.9 of it). Both sides send the rollout service exactly the same
requests: per prompt G requests of n = 1 with the prompt's seed and `first_sample_index` j, at most
`concurrency` x G samples in flight, so both generate the very same tokens and the ratio of their
tokens/s is the ratio of their wall times.

    engine alone   a thread per sample sends its request straight to the rollout service (no teacher, no
                   Redis): generated completion tokens / wall time
    worker path    `RolloutWorker.run()` over the same prompts: generate, teacher Score per sample as soon
                   as it finishes, record, XADD; completion tokens in the written records / wall time

Services run as their own processes, as deployed: `opd rollout serve` (hf backend) and `opd teacher
serve` (hf), an embedded redis-server; the worker runs in this process. Models: random-init tiny Llamas
(hidden 64, 2 layers; nothing is downloaded) whose generation config has no end-of-sequence id, so every
sample runs the full --new-tokens. The two sides alternate --repeats times (other load on the machine
hits both alike); the best run of each is compared, the medians beside. On a 2-core CPU the teacher
shares the cores with the engine it overlaps, so the measured ratio is a floor of what separate teacher
GPUs give. Output: stdout and bench/results/worker_throughput.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

from opd_teacher_client import TeacherClient  # noqa: E402

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama  # noqa: E402
from launcher.cli_proc import CliProc  # noqa: E402
from services.common.redis_keys import connect  # noqa: E402
from services.common.redis_server import EmbeddedRedis, free_port  # noqa: E402
from services.rollout.client import RolloutClient  # noqa: E402
from services.rollout.protocol import GenerateRequest  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.loop import RolloutWorker  # noqa: E402
from services.worker.record import request_seed  # noqa: E402

SEED = 7


def build_models(tmp: Path, new_tokens: int) -> tuple[Path, Path]:
    tok = build_char_tokenizer()
    paths = []
    for name, seed in (("student", 0), ("teacher", 1)):
        path = make_tiny_llama(tmp / name, seed=seed, tokenizer=tok, max_positions=new_tokens + 128)
        model = AutoModelForCausalLM.from_pretrained(path)
        model.generation_config.eos_token_id = []  # no end marker: every sample runs the full length
        model.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def start(name: str, args: list[str], log_dir: Path) -> CliProc:
    proc = CliProc(args, log_dir / f"{name}.log")
    proc.start()
    return proc


def wait_ready(check, procs: list[CliProc], what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive:
                raise RuntimeError(f"{what}: a service exited:\n{p.log()[-2000:]}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def engine_alone(rollout: RolloutClient, prompts: list[str], args) -> tuple[float, int]:
    """The worker's requests, straight to the rollout service: (seconds, completion tokens)."""
    requests = [
        GenerateRequest(
            texts=[text],
            n=1,
            max_new_tokens=args.new_tokens,
            top_p=0.9,
            seed=request_seed(SEED, row, 0),
            first_sample_index=j,
        )
        for row, text in enumerate(prompts)
        for j in range(args.group_size)
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency * args.group_size) as pool:
        responses = list(pool.map(rollout.generate, requests))
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r.samples[0].token_ids) for r in responses)


def worker_path(rollout, teacher, redis_url: str, prompts_file: Path, student: Path, args, run: str):
    cfg = WorkerConfig(
        run=run,
        redis_url=redis_url,
        prompts=str(prompts_file),
        tokenizer=str(student),
        group_size=args.group_size,
        max_new_tokens=args.new_tokens,
        top_k=args.top_k,
        concurrency=args.concurrency,
        epochs=1,
        seed=SEED,
        max_backlog=10_000,
        log_interval_s=3600,
    )
    worker = RolloutWorker(cfg, rollout, teacher, connect(redis_url))
    t0 = time.perf_counter()
    totals = worker.run()
    return time.perf_counter() - t0, int(totals["tokens"]), int(totals["records"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=4096, help="tokens per sample (no end marker)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=4, help="G")
    ap.add_argument("--concurrency", type=int, default=2, help="prompts in flight (x G samples)")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "worker_throughput.txt"))
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        student, teacher_model = build_models(tmp, args.new_tokens)
        prompts = [f"{a}+{b}=" for a, b in zip(range(11, 99, 13), range(3, 90, 7), strict=False)][
            : args.prompts
        ]
        prompts_file = tmp / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        r_port, t_port = free_port(), free_port()
        redis = EmbeddedRedis(data_dir=tmp / "redis")
        redis.start()
        procs = []
        try:
            procs.append(start("rollout", ["rollout", "serve", "--model", str(student), "--device", "cpu",
                                           "--port", str(r_port), "--insecure-no-token", "--max-batch-size",
                                           "256", "--log-level", "warning"], tmp))  # fmt: skip
            procs.append(start("teacher", ["teacher", "serve", "--model", str(teacher_model), "--device",
                                            "cpu", "--port", str(t_port), "--max-sequence-tokens",
                                            str(args.new_tokens + 128)], tmp))  # fmt: skip
            url = f"http://127.0.0.1:{r_port}"
            wait_ready(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, procs, "rollout")
            timeout = max(600.0, args.new_tokens * 0.5)
            with (
                RolloutClient(url, timeout_s=timeout) as rollout,
                TeacherClient([f"127.0.0.1:{t_port}"], timeout_s=timeout) as teacher,
            ):
                wait_ready(lambda: teacher.info() is not None, procs, "teacher")
                runs: dict[str, list[tuple[float, int]]] = {"engine alone": [], "worker path": []}
                for r in range(args.repeats):
                    runs["engine alone"].append(engine_alone(rollout, prompts, args))
                    s, tokens, records = worker_path(
                        rollout, teacher, redis.url, prompts_file, student, args, f"bench{r}"
                    )
                    assert records == len(prompts), f"worker wrote {records} of {len(prompts)} records"
                    runs["worker path"].append((s, tokens))
                    print(
                        f"run {r + 1}/{args.repeats}: "
                        + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in runs.items())
                    )
        finally:
            for p in procs:
                p.terminate(30)
            redis.stop()
    tokens = {k: {t for _, t in v} for k, v in runs.items()}
    same = tokens["engine alone"] == tokens["worker path"] and len(tokens["engine alone"]) == 1
    best = {k: max(t / s for s, t in v) for k, v in runs.items()}
    median = {k: statistics.median(t / s for s, t in v) for k, v in runs.items()}
    lines = [
        f"worker path vs rollout engine alone (hf, CPU, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}): tiny Llama hidden 64 x 2 layers, {args.prompts} prompts x G = "
        f"{args.group_size} samples of {args.new_tokens} tokens, {args.concurrency} prompts in flight, "
        f"teacher top-{args.top_k}; {args.repeats} alternating runs each",
        "",
        f"{'path':<13} {'tokens':>8} {'best tok/s':>11} {'median tok/s':>13}",
    ]
    for k in runs:
        lines.append(f"{k:<13} {next(iter(tokens[k])):>8,} {best[k]:>11.1f} {median[k]:>13.1f}")
    lines += [
        "",
        f"ratio worker / engine: best {best['worker path'] / best['engine alone']:.3f}, median "
        f"{median['worker path'] / median['engine alone']:.3f} (target >= 0.9); same tokens both ways: {same}",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
