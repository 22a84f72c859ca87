"""Teacher prompt cost per group with and without shared-prompt reuse (hf backend, CPU, tiny model).

    nice -n 10 .venv/bin/python bench/long_rollout.py            # ~1-2 min on 2 cores
    .venv/bin/python bench/long_rollout.py --repeats 1 --groups 1  # a quick look

The G samples of a group share their prompt. The hf scorer runs a prompt shared by several sequences of a
forward once and scores the completions from its KV cache (`prefix_reuse`, services/teacher/scorer.py).
This bench scores groups through the real batcher and metrics (services/teacher/batcher.py, metrics.py)
with reuse off and on and reports, per group:

    prompt requested   tokens before score_from summed over the G sequences (G x P)
    prompt computed    those the model ran (opd_teacher_prompt_tokens_computed_total): target P = cost / G
    tokens run         every token the decoder ran: G x (P + L) without reuse, P + G x L with it
    s / group          scoring time: per group the fastest of --repeats runs (the machine is shared; off and
                       on runs alternate), averaged over the groups; `median` the same with medians
    max |diff|         the largest difference of any returned log-probability between the two runs

Model: a random-init Llama built locally (nothing is downloaded): hidden 256, 4 layers, 4 heads of 64,
intermediate 688, vocabulary 2048 (so the LM head is about a seventh of a token's cost, as at 7B / 152K),
float32 on the CPU. Two shapes: a long shared prompt with short completions (few-shot or multi-turn
prompts) and the paper's shape scaled down 8x (prompt 128, completions 1-2K where the paper has ~200 and up
to 15K): the saving is (G - 1) x P / (G x (P + L)) of the decoder's tokens, large in the first and small in
the second. Output: stdout and bench/results/long_rollout.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

from experiments.tiny_models import make_tiny_llama  # noqa: E402
from services.teacher.batcher import Batcher  # noqa: E402
from services.teacher.metrics import TeacherMetrics  # noqa: E402
from services.teacher.scorer import HFScorer, ScoreItem, ScoreResult  # noqa: E402

SHAPES = {  # name: (prompt tokens, shortest completion, longest completion)
    "long prompt": (1024, 128, 256),
    "paper / 8": (128, 1024, 2048),
}


def build_model(path: Path, vocab: int) -> Path:
    make_tiny_llama(
        path, seed=0, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, max_positions=4096
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(vocab)
    model.save_pretrained(path)
    return path


def make_groups(rng, vocab: int, count: int, G: int, shape: tuple[int, int, int]) -> list[list[ScoreItem]]:
    P, lo, hi = shape
    groups = []
    for _ in range(count):
        prompt = rng.integers(0, vocab, P)
        groups.append(
            [
                ScoreItem(np.r_[prompt, rng.integers(0, vocab, int(n))].astype(np.int32), P, top_k=32)
                for n in rng.integers(lo, hi + 1, G)
            ]
        )
    return groups


def run(
    scorers: dict[bool, HFScorer], groups: list[list[ScoreItem]], repeats: int
) -> tuple[dict[bool, dict], dict[bool, list[list[ScoreResult]]]]:
    """Score every group `repeats` times with reuse off and on, interleaved (so that other load on the
    machine hits both alike), one group per forward, through a batcher and its metrics each."""
    budget = max(len(g) * max(len(it.token_ids) for it in g) for g in groups)
    metrics = {reuse: TeacherMetrics() for reuse in scorers}
    batchers = {
        reuse: Batcher(sc.score, max_batch_tokens=budget, window_s=0.0, max_queue=4, metrics=metrics[reuse])
        for reuse, sc in scorers.items()
    }
    times: dict[bool, list[list[float]]] = {reuse: [[] for _ in groups] for reuse in scorers}
    results: dict[bool, list[list[ScoreResult]]] = {reuse: [] for reuse in scorers}
    try:
        for r in range(repeats):
            for i, g in enumerate(groups):
                for reuse, batcher in batchers.items():
                    t0 = time.perf_counter()
                    out = batcher.submit(g).future.result(600)
                    times[reuse][i].append(time.perf_counter() - t0)
                    if r == 0:
                        results[reuse].append(out)
    finally:
        for batcher in batchers.values():
            batcher.close(5)
    n = len(groups) * repeats
    stats = {}
    for reuse, m in metrics.items():
        value = m.registry.get_sample_value
        stats[reuse] = {
            "requested": value("opd_teacher_prompt_tokens_requested_total") / n,
            "computed": value("opd_teacher_prompt_tokens_computed_total") / n,
            # per group the fastest of the repeats (the least disturbed), averaged over the groups
            "seconds": statistics.mean(min(t) for t in times[reuse]),
            "median": statistics.mean(statistics.median(t) for t in times[reuse]),
            "batches": value("opd_teacher_batch_sequences_count") / n,
        }
    return stats, results


def max_diff(a: list[list[ScoreResult]], b: list[list[ScoreResult]]) -> tuple[float, int]:
    diff, id_mismatch = 0.0, 0
    for ga, gb in zip(a, b, strict=True):
        for x, y in zip(ga, gb, strict=True):
            diff = max(
                diff,
                float(np.abs(x.topk_logprobs - y.topk_logprobs).max()),
                float(np.abs(x.target_logprobs - y.target_logprobs).max()),
            )
            id_mismatch += int((x.topk_ids != y.topk_ids).sum())
    return diff, id_mismatch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=8, help="G, samples per prompt")
    ap.add_argument("--groups", type=int, default=2, help="groups per shape")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the groups (median)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "long_rollout.txt"))
    args = ap.parse_args()
    G = args.group_size
    torch.manual_seed(0)
    lines = [
        f"teacher shared-prompt reuse (hf, CPU, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}): random Llama hidden 256 x 4 layers, V = {args.vocab}, float32; "
        f"G = {G}, {args.groups} groups per shape, one group per forward, {args.repeats} runs each",
        "",
        f"{'shape':<12} {'P':>5} {'L':>10} {'reuse':<5} {'prompt requested':>17} {'prompt computed':>16} "
        f"{'computed/req':>12} {'tokens run':>11} {'s / group':>9} {'median':>7} {'speed-up':>8}",
    ]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "teacher", args.vocab)
        scorers = {
            reuse: HFScorer(str(path), device="cpu", dtype="float32", prefix_reuse=reuse)
            for reuse in (False, True)
        }
        assert scorers[True].prefix_reuse, "the startup self-check refused prefix reuse"
        for name, shape in SHAPES.items():
            groups = make_groups(np.random.default_rng(1), args.vocab, args.groups, G, shape)
            tokens_off = statistics.mean(sum(len(it.token_ids) for it in g) for g in groups)
            mean_L = tokens_off / G - shape[0]
            stats, outs = run(scorers, groups, args.repeats)
            for reuse in (False, True):
                s = stats[reuse]
                run_tokens = tokens_off - s["requested"] + s["computed"]
                lines.append(
                    f"{name:<12} {shape[0]:>5} {f'{shape[1]}-{shape[2]}':>10} {'on' if reuse else 'off':<5} "
                    f"{s['requested']:>17,.0f} {s['computed']:>16,.0f} {s['computed'] / s['requested']:>12.3f} "
                    f"{run_tokens:>11,.0f} {s['seconds']:>9.2f} {s['median']:>7.2f} "
                    f"{stats[False]['seconds'] / s['seconds']:>7.2f}x"
                )
            diff, mismatched = max_diff(outs[False], outs[True])
            saved = (G - 1) * shape[0] / (G * (shape[0] + mean_L))
            notes.append(
                f"{name}: mean completion {mean_L:.0f}; decoder tokens saved (G-1)P / G(P+L) = {saved:.1%}; "
                f"max |log-prob diff| reuse vs none {diff:.2e}, top-K ids differing {mismatched}; "
                f"forwards per group {stats[True]['batches']:.0f}"
            )
    lines += ["", *notes]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
