"""The vllm scorer's prefix-cache reads against a fake engine with both of vLLM 0.32's output layouts.

With `skip_reading_prefix_cache=False` a request with prompt_logprobs may hit c cached tokens, whose rows are
never computed. Model runner V1 (CPU) returns every position and leaves positions 1..c uninitialised;
model runner V2 (CUDA's default) returns only positions c+1..n-1. The real engine on the CPU (V1) is tested
in tests/integration/test_teacher_vllm.py; here a fake engine plays both, with garbage in V1's holes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from services.teacher import memory
from services.teacher.scorer import ScoreItem, VLLMScorer

FlatLogprobs = pytest.importorskip("vllm.logprobs").FlatLogprobs
V, BLOCK = 50, 4


def row(ids: list[int], p: int, k: int) -> tuple[list[int], list[float]]:
    """The (fake) distribution at position p: target first, then the top-k; depends on ids[:p + 1]."""
    h = sum((i + 1) * t for i, t in enumerate(ids[: p + 1])) % V
    top = [(h + j) % V for j in range(k)]
    return [ids[p], *top], [-0.5 * ((ids[p] - h) % V), *(-0.1 * j - 0.01 * (h % 7) for j in range(k))]


class FakeLLM:
    """`generate` with a prefix cache of whole blocks; `v2` picks the output layout."""

    def __init__(self, v2: bool):
        self.v2 = v2
        self.blocks: set[tuple[int, ...]] = set()

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for prompt, sp in zip(prompts, params, strict=True):
            ids = prompt["prompt_token_ids"]
            n, c = len(ids), 0
            if not sp.skip_reading_prefix_cache:
                while c + BLOCK <= n - 1 and tuple(ids[: c + BLOCK]) in self.blocks:
                    c += BLOCK
            for b in range(BLOCK, n + 1, BLOCK):
                self.blocks.add(tuple(ids[:b]))
            flat = FlatLogprobs()
            flat.append(None)
            for p in range(1, n):
                if p <= c and self.v2:
                    continue  # V2: only computed positions
                tok, lp = row(ids, p, sp.prompt_logprobs)
                if p <= c:  # V1: uninitialised memory
                    tok, lp = [7] * len(tok), [123.0] * len(lp)
                flat.start_indices.append(len(flat.token_ids))
                flat.token_ids.extend(tok)
                flat.logprobs.extend(lp)
                flat.ranks.extend([1] * len(tok))
                flat.decoded_tokens.extend([None] * len(tok))
                flat.end_indices.append(len(flat.token_ids))
            outs.append(SimpleNamespace(prompt_logprobs=flat, num_cached_tokens=c))
        return outs


def fake_scorer(v2: bool, kv_blocks: int = 10_000) -> VLLMScorer:
    sc = object.__new__(VLLMScorer)
    sc.llm = FakeLLM(v2)
    sc._SamplingParams = lambda **kw: SimpleNamespace(**kw)
    sc.prefix_reuse, sc.block_size, sc.kv_blocks = True, BLOCK, kv_blocks
    return sc


def expected(it: ScoreItem):
    ids = it.token_ids.tolist()
    rows = [row(ids, p, it.top_k) for p in range(it.score_from, len(ids))]
    return np.array([r[0][1:] for r in rows]), np.array([r[1][1:] for r in rows]), [r[1][0] for r in rows]


@pytest.mark.parametrize("v2", [False, True])
def test_reads_of_a_shared_prompt_and_rescoring_past_score_from(v2):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, 10)
    group = [ScoreItem(np.r_[prompt, rng.integers(0, V, c)].astype(np.int32), 10, 3) for c in (5, 9, 1)]
    sc = fake_scorer(v2)
    results = sc.score(group)
    # the first computes its prompt; the others hit 8 tokens (two blocks) and compute 2
    assert [r.prompt_tokens_computed for r in results] == [10, 2, 2]
    again = group[1]  # hits 12 tokens > score_from: rows 10..12 are not computed, so it is scored again
    (r_again,) = sc.score([again])
    assert r_again.prompt_tokens_computed == 10
    for it, r in zip([*group, again], [*results, r_again], strict=True):
        ids, lps, target = expected(it)
        np.testing.assert_array_equal(r.topk_ids, ids)
        np.testing.assert_allclose(r.topk_logprobs, lps, rtol=1e-6)
        np.testing.assert_allclose(r.target_logprobs, target, rtol=1e-6)


def test_no_reads_when_the_batch_could_be_preempted():
    # Sequences of 15, 19 and 11 tokens need 4 + 5 + 3 blocks: with 8, vLLM might preempt one, whose second
    # cache lookup num_cached_tokens would not report, so the batch does not read the cache at all.
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, V, 10)
    group = [ScoreItem(np.r_[prompt, rng.integers(0, V, c)].astype(np.int32), 10, 3) for c in (5, 9, 1)]
    results = fake_scorer(v2=False, kv_blocks=8).score(group)
    assert [r.prompt_tokens_computed for r in results] == [10, 10, 10]


def test_vllm_buffer_by_runner():
    v1 = memory.vllm_logprob_buffer(8192, 152064, 2, 1, v2_runner=False)
    v2 = memory.vllm_logprob_buffer(8192, 152064, 2, 1, v2_runner=True)
    assert (v1.rows, v1.bytes_per_entry) == (8192, 7) and (v2.rows, v2.bytes_per_entry) == (1024, 2)
    assert memory.vllm_logprob_buffer(512, 152064, 2, 2, v2_runner=True).rows == 512
    assert memory.vllm_logprob_buffer(512, 152064, 2, 2, v2_runner=True).bytes_per_entry == 4
