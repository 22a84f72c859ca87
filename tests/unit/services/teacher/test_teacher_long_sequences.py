"""The teacher at long sequences: bounded log-prob buffers, the startup memory check, shared prompts.

- The hf LM head's transient memory is O(row_chunk x V) whatever the number of rows, and chunked scoring
  equals scoring every row at once.
- A configuration whose worst-case log-prob buffers do not fit is refused at startup, naming the limit.
- The G samples of a group share their prompt: the hf scorer runs it once, with the same numbers, and
  /metrics counts prompt tokens requested and computed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from experiments.tiny_models import make_tiny_llama
from services.common.config import ConfigError, build_config
from services.common.hf_models import load_causal_lm
from services.teacher import memory
from services.teacher.batcher import Batcher
from services.teacher.config import TeacherConfig
from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import HFScorer, ScoreItem, build_scorer, check_memory, shared_prompt_groups
from services.teacher.server import run_server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", seed=7, max_positions=1024)
    model = load_causal_lm(path)
    with torch.no_grad():  # spread the logits so the top-K order is not a near-tie everywhere
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A vocabulary of 16384 so that the LM head's [rows, V] buffers dominate a forward's memory."""
    path = make_tiny_llama(tmp_path_factory.mktemp("teacher") / "wide", seed=8)
    model = load_causal_lm(path)
    model.resize_token_embeddings(16384)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(model_dir):
    return HFScorer(str(model_dir), device="cpu", dtype="float32")


def assert_same(a, b, atol=1e-5):
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=atol)
    np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=atol)
    if a.candidate_logprobs is None:
        assert b.candidate_logprobs is None
    else:
        np.testing.assert_allclose(a.candidate_logprobs, b.candidate_logprobs, atol=atol)


def group(rng, V, prompt_len, completion_lens, top_k=6, **kw) -> list[ScoreItem]:
    prompt = rng.integers(0, V, prompt_len)
    return [
        ScoreItem(np.r_[prompt, rng.integers(0, V, c)].astype(np.int32), prompt_len, top_k, **kw)
        for c in completion_lens
    ]


# -- bounded log-prob buffers ------------------------------------------------------------------------------


def peak_bytes(fn) -> int:
    """Peak CPU bytes allocated by torch while `fn` runs (the profiler's allocation events, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_head_peak_is_row_chunk_times_vocab(wide_model_dir, dtype):
    V, chunk = 16384, 16
    sc = HFScorer(str(wide_model_dir), device="cpu", dtype=dtype, row_chunk=chunk, prefix_reuse=False)
    rng = np.random.default_rng(0)
    peaks = []
    for n in (200, 800):  # 4x the rows, the same buffers
        items = [ScoreItem(rng.integers(0, V, n).astype(np.int32), 1, top_k=8)]
        sc.score(items)  # warm-up
        peaks.append(peak_bytes(lambda items=items: sc.score(items)))
    per_chunk = chunk * V * memory.HF_BYTES_PER_ENTRY  # the bound the startup check uses
    for n, peak in zip((200, 800), peaks, strict=True):
        # plus O(n x hidden) for the decoder's activations (hidden 64: about 1 KiB a token)
        assert peak <= per_chunk * 1.02 + 2048 * n, (n, peak, per_chunk)
    assert peaks[0] >= per_chunk * 0.9  # the bound is tight, not vacuous
    assert sc.logprob_buffer(max_batch_tokens=4096).bytes == per_chunk


def test_small_row_chunk_equals_every_row_at_once(model_dir, scorer):
    rng = np.random.default_rng(3)
    V = scorer.info.vocab_size
    whole = HFScorer(str(model_dir), device="cpu", dtype="float32", row_chunk=100_000, prefix_reuse=False)
    chunked = HFScorer(str(model_dir), device="cpu", dtype="float32", row_chunk=7, prefix_reuse=False)
    items = [
        ScoreItem(rng.integers(0, V, 600).astype(np.int32), 37, top_k=16, temperature=0.7),
        ScoreItem(
            rng.integers(0, V, 90).astype(np.int32),
            1,
            top_k=4,
            candidates=rng.integers(0, V, 5).astype(np.int32),
        ),
    ]
    for a, b in zip(whole.score(items), chunked.score(items), strict=True):
        assert_same(a, b)


# -- the startup check ---------------------------------------------------------------------------------------


def test_logprob_buffer_arithmetic():
    assert memory.vllm_bytes_per_entry(2, 1) == 7  # bf16 logits + fp32 log_softmax + bool rank mask
    assert memory.vllm_bytes_per_entry(2, 2) == 9  # TP gathers the vocabulary shards into a second copy
    assert memory.vllm_bytes_per_entry(4, 1) == 9
    # The paper's teacher (Qwen2.5 vocabulary, 152064 logits) at 4096 tokens per vLLM step, bfloat16:
    buf = memory.LogprobBuffer(4096, 152064, 7, "vllm_max_num_batched_tokens")
    assert buf.bytes == 4096 * 152064 * 7 and round(buf.bytes / memory.GiB, 2) == 4.06
    memory.check_logprob_buffer(buf, buf.bytes, "exactly enough")  # fits: no error
    with pytest.raises(ConfigError) as err:
        memory.check_logprob_buffer(buf, 3 * memory.GiB, "a test")
    msg = str(err.value)
    assert msg.startswith("vllm_max_num_batched_tokens=4096:") and "4.06 GiB" in msg and "3.00 GiB" in msg
    assert f"at most {3 * memory.GiB // (152064 * 7)}" in msg  # 3026 rows would fit


def test_config_parallelism_and_step_tokens():
    def cfg(**values):
        return build_config(TeacherConfig, {"model": "m", **values}, env={})

    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        with pytest.raises(ConfigError, match=f"{name}=2: the hf backend"):
            cfg(**{name: "2"})
        with pytest.raises(ConfigError, match=f"{name}: must be >= 1"):
            cfg(backend="vllm", **{name: "0"})
    c = cfg(backend="vllm", tensor_parallel_size="4", pipeline_parallel_size="2")
    assert (c.tensor_parallel_size, c.pipeline_parallel_size) == (4, 2)
    assert cfg().vllm_step_tokens == 4096  # min(max_batch_tokens = 16384, 4096)
    assert cfg(max_batch_tokens="1024", max_sequence_tokens="1024").vllm_step_tokens == 1024
    assert cfg(vllm_max_num_batched_tokens="512").vllm_step_tokens == 512
    with pytest.raises(ConfigError, match="vllm_max_num_batched_tokens"):
        cfg(vllm_max_num_batched_tokens="-1")
    with pytest.raises(ConfigError, match="logprob_memory_budget_gib"):
        cfg(logprob_memory_budget_gib="-1")


def test_startup_refuses_buffers_over_the_budget(model_dir, scorer):
    V = scorer.info.vocab_size
    base = dict(model=str(model_dir), port=0, device="cpu", dtype="float32", row_chunk=1000)
    # 1000 rows x V x 8 B against a budget of 100 rows: refused before serving, naming row_chunk
    budget = 100 * V * memory.HF_BYTES_PER_ENTRY / memory.GiB
    with pytest.raises(ConfigError, match=r"row_chunk=1000: .* set row_chunk to at most 100\b"):
        build_scorer(TeacherConfig(**base, logprob_memory_budget_gib=budget))
    # through the server: the port was bound, the model loaded, then the same refusal (exit 2 in `main`)
    with pytest.raises(ConfigError, match="row_chunk=1000"):
        with run_server(TeacherConfig(**base, logprob_memory_budget_gib=budget)):
            pass
    # a batch budget below the chunk bounds the rows instead, and is the limit named
    small = dict(base, max_batch_tokens=400, max_sequence_tokens=400)
    with pytest.raises(ConfigError, match="max_batch_tokens=400"):
        build_scorer(TeacherConfig(**small, logprob_memory_budget_gib=budget))
    # measured: the tiny model's buffers fit the RAM of any test machine
    build_scorer(TeacherConfig(**base)).close()


def test_unmeasurable_memory_is_a_warning_not_a_refusal(model_dir, scorer, monkeypatch, caplog):
    def no_nvml():
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setattr(scorer, "available_memory", no_nvml)
    check_memory(TeacherConfig(model=str(model_dir), device="cpu"), scorer)
    assert "could not measure free memory (NVML Shared Library Not Found)" in caplog.text
    # a configured budget is still checked: the scorer's default chunk (2^26 / V rows) is over the batch
    with pytest.raises(ConfigError, match="max_batch_tokens=16384"):
        check_memory(
            TeacherConfig(model=str(model_dir), device="cpu", logprob_memory_budget_gib=0.001),
            scorer,
        )


# -- shared prompts ------------------------------------------------------------------------------------------


def test_shared_prompt_groups():
    a, b = np.array([1, 2, 3, 4], np.int32), np.array([1, 2, 3, 5], np.int32)
    items = [
        ScoreItem(a, 3, 1),
        ScoreItem(b, 3, 1),
        ScoreItem(b, 2, 1),
        ScoreItem(a, 2, 1),
        ScoreItem(b, 1, 1),
    ]
    assert shared_prompt_groups(items) == [[0, 1], [2, 3]]  # the same first score_from tokens
    assert shared_prompt_groups(items[:1] + items[4:]) == []


def test_prefix_reuse_gives_the_same_numbers(model_dir, scorer):
    assert scorer.prefix_reuse  # the startup self-check accepted the architecture
    rng = np.random.default_rng(5)
    V = scorer.info.vocab_size
    g1 = group(rng, V, 40, [30, 1, 55, 12])  # G = 4, one completion of a single row
    g2 = group(rng, V, 9, [20, 20], top_k=3, temperature=0.5)
    g2[1].candidates = rng.integers(0, V, (20, 3)).astype(np.int32)
    lone = [ScoreItem(rng.integers(0, V, 33).astype(np.int32), 5, 8)]
    items = [g1[0], g2[0], lone[0], g1[1], g1[2], g2[1], g1[3]]  # interleaved, as a batch may hold them
    plain = HFScorer(str(model_dir), device="cpu", dtype="float32", prefix_reuse=False)
    shared, full = scorer.score(items), plain.score(items)
    for a, b in zip(shared, full, strict=True):
        assert_same(a, b)
    assert [r.prompt_tokens_computed for r in shared] == [40, 9, 5, 0, 0, 0, 0]  # each prompt once
    assert [r.prompt_tokens_computed for r in full] == [it.score_from for it in items]


def test_prompt_counters_show_prompt_cost_over_g(scorer):
    rng = np.random.default_rng(6)
    V = scorer.info.vocab_size
    G, P = 8, 64
    metrics = TeacherMetrics()
    batcher = Batcher(scorer.score, max_batch_tokens=G * 200, window_s=0.0, max_queue=4, metrics=metrics)
    try:
        batcher.submit(group(rng, V, P, rng.integers(20, 100, G).tolist())).future.result(60)
    finally:
        batcher.close(5)
    value = metrics.registry.get_sample_value
    assert value("opd_teacher_prompt_tokens_requested_total") == G * P
    assert value("opd_teacher_prompt_tokens_computed_total") == P  # the prompt's cost / G per sample


def test_prefix_reuse_is_disabled_for_a_decoder_that_cannot_continue(model_dir):
    class NoCache(HFScorer):
        def _hidden_shared_prompt(self, items):
            raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")

    sc = NoCache(str(model_dir), device="cpu", dtype="float32")
    assert not sc.prefix_reuse
    rng = np.random.default_rng(7)
    results = sc.score(group(rng, sc.info.vocab_size, 10, [5, 6]))  # still served, by the padded path
    assert [r.prompt_tokens_computed for r in results] == [10, 10]
