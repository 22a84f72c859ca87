"""Trainer throughput per batch, broken down into read / loss / optimizer / checkpoint / push.

Everything is real and local: a redis-server (EmbeddedRedis), a rollout service (hf backend, uvicorn on
loopback) receiving a weight push after every batch, and the trainer driver (`trainer.train.run`) reading
synthetic-but-valid records (real student/teacher log-probabilities, experiments/synthetic.py) from the stream.

    .venv/bin/python bench/trainer_step.py                 # small Llama, V ~ 4k, batch 32, mini-batch 16
    .venv/bin/python bench/trainer_step.py --batches 3 --hidden 128 --layers 2

Prints one row per batch and the mean over batches after the first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from experiments.synthetic import synthetic_records, write_records
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.redis_server import EmbeddedRedis
from services.rollout.app import build_app
from services.rollout.client import RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.server import running_server
from trainer.config import TrainerConfig
from trainer.metrics import read_metrics
from trainer.train import run

TOKEN = "bench-token"
COLUMNS = [
    "time/read",
    "time/collate",
    "time/loss",
    "time/optim",
    "time/checkpoint",
    "time/push",
    "time/batch",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=128, help="max completion length (min is half)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096, help="approximate vocabulary size")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--objective", default="lsm")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    # a character vocabulary of about --vocab symbols, so the LM head has a realistic share of the cost
    alphabet = "".join(chr(0x4E00 + i) for i in range(max(0, args.vocab - 90))) + "0123456789+=\n abc"
    tok = build_char_tokenizer(alphabet=alphabet)
    size = dict(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        max_positions=args.prompt_len + args.completion_len + 8,
    )
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp, EmbeddedRedis() as server:
        root = Path(tmp)
        student_dir = make_tiny_llama(root / "student", seed=0, tokenizer=tok, **size)
        teacher_dir = make_tiny_llama(root / "teacher", seed=1, tokenizer=tok, **size)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        n_records = -(-args.batch_size // args.group_size) * args.batches
        t0 = time.perf_counter()
        records = synthetic_records(
            student,
            teacher,
            n_records=n_records,
            group_size=args.group_size,
            prompt_len=args.prompt_len,
            completion_len=(args.completion_len // 2, args.completion_len),
            top_k=args.top_k,
            behaviour_top_k=args.top_k,
            special_ids=sorted(set(tok.all_special_ids)),
            eos_id=tok.eos_token_id,
        )
        print(f"built {n_records} records x {args.group_size} samples in {time.perf_counter() - t0:.1f} s")
        write_records(redis_keys.connect(server.url), "bench", records)
        n_params = sum(p.numel() for p in student.parameters())
        del student, teacher

        rcfg = RolloutConfig(
            model=str(student_dir), backend="hf", device="cpu", port=0, token=TOKEN, log_level="warning"
        )
        with running_server(build_app(rcfg)) as url:
            RolloutClient(url).wait_ready(300)
            cfg = TrainerConfig(
                model=str(student_dir),
                device="cpu",
                redis_url=server.url,
                run="bench",
                batch_size=args.batch_size,
                mini_batch_size=args.mini_batch_size,
                top_k=args.top_k,
                objective=args.objective,
                lr=1e-5,
                read_block_ms=200,
                idle_timeout_s=2.0,
                max_policy_lag=1_000_000,  # the synthetic records are all version 0
                max_batches=args.batches,
                checkpoint_dir=str(root / "ckpt"),
                tensorboard=False,
                progress=False,
                push_every=1,
                rollout_urls=[url],
                weights_token_file=str(_token_file(root)),
                diagnostics_every=0,
            )
            state = run(cfg)
        rows = read_metrics(cfg.metrics_dir)

    print(
        f"model: d={args.hidden} layers={args.layers} V={len(tok)} params={n_params / 1e6:.1f}M; "
        f"batch {args.batch_size} seqs, mini-batch {args.mini_batch_size}, K={args.top_k}, objective {args.objective}; "
        f"torch threads {torch.get_num_threads()}; trained {state.batch} batches, policy version {state.policy_version}"
    )
    header = (
        f"{'batch':>5} {'tokens':>7} "
        + " ".join(f"{c.split('/')[1]:>10}" for c in COLUMNS)
        + f" {'tok/s':>9}"
    )
    print(header)
    for m in rows:
        print(
            f"{m['batch']:>5} {int(m['train/tokens']):>7} "
            + " ".join(f"{m[c]:>10.3f}" for c in COLUMNS)
            + f" {m['perf/tokens_per_s']:>9.0f}"
        )
    steady = rows[1:] or rows
    mean = {c: sum(m[c] for m in steady) / len(steady) for c in COLUMNS + ["train/tokens"]}
    total = mean["time/batch"]
    print(
        f"{'mean':>5} {int(mean['train/tokens']):>7} "
        + " ".join(f"{mean[c]:>10.3f}" for c in COLUMNS)
        + f" {mean['train/tokens'] / total:>9.0f}"
    )
    shares = {c.split("/")[1]: mean[c] / total for c in COLUMNS[:-1]}
    print("share of batch time: " + json.dumps({k: round(v, 3) for k, v in shares.items()}))


def _token_file(root: Path) -> Path:
    path = root / "token"
    path.write_text(TOKEN)
    return path


if __name__ == "__main__":
    main()
