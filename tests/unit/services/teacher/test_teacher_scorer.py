"""HF scorer against a naive reference written from the definition: log_softmax(model(x).logits / T)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.common.vocab import vocab_sha256
from services.teacher.scorer import HFScorer, ScoreItem


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", seed=3)
    model = load_causal_lm(path)
    with torch.no_grad():  # spread the logits so the top-K order is not a near-tie everywhere
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_model(model_dir):
    return load_causal_lm(model_dir).eval()


@pytest.fixture(scope="module")
def scorer(model_dir):
    return HFScorer(str(model_dir), device="cpu", dtype="float32")


def reference_rows(model, ids: np.ndarray, score_from: int, temperature: float = 1.0) -> np.ndarray:
    """float32 [rows, V]: row t = log q(. | x_<t) for t = score_from .. n-1 (the logits at t - 1)."""
    with torch.no_grad():
        logits_T_V = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].float()
    return torch.log_softmax(logits_T_V / temperature, dim=-1)[score_from - 1 : len(ids) - 1].numpy()


def assert_topk(ids_R_K: np.ndarray, lp_R_K: np.ndarray, ref_R_V: np.ndarray, atol: float) -> None:
    """Values by rank equal the reference's top-K; each returned id carries its own reference logprob."""
    k = ids_R_K.shape[1]
    np.testing.assert_allclose(lp_R_K, -np.sort(-ref_R_V, axis=1)[:, :k], atol=atol)
    np.testing.assert_allclose(np.take_along_axis(ref_R_V, ids_R_K.astype(np.int64), 1), lp_R_K, atol=atol)
    assert all(len(set(row)) == k for row in ids_R_K.tolist())
    assert np.all(np.diff(lp_R_K, axis=1) <= 1e-6)  # descending


def random_ids(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=n).astype(np.int32)


def test_batch_of_mixed_lengths_matches_reference(scorer, reference_model):
    rng = np.random.default_rng(0)
    V = scorer.info.vocab_size
    specs = [(17, 5), (3, 1), (40, 39), (9, 4), (25, 12)]  # (n, score_from = prompt length)
    items = [ScoreItem(random_ids(rng, n, V), s, top_k=8) for n, s in specs]
    results = scorer.score(items)
    for it, r in zip(items, results, strict=True):
        ref = reference_rows(reference_model, it.token_ids, it.score_from)
        assert r.topk_ids.shape == (it.rows, 8) and r.topk_ids.dtype == np.int32
        assert r.topk_logprobs.dtype == np.float32 and r.target_logprobs.shape == (it.rows,)
        assert_topk(r.topk_ids, r.topk_logprobs, ref, atol=1e-4)
        expected_target = ref[np.arange(it.rows), it.token_ids[it.score_from :]]
        np.testing.assert_allclose(r.target_logprobs, expected_target, atol=1e-4)
        assert r.candidate_logprobs is None


def test_row_chunking_gives_the_same_numbers(model_dir, scorer):
    chunked = HFScorer(str(model_dir), device="cpu", dtype="float32", row_chunk=3)
    rng = np.random.default_rng(1)
    items = [ScoreItem(random_ids(rng, n, scorer.info.vocab_size), 2, top_k=5) for n in (11, 4, 8)]
    for a, b in zip(scorer.score(items), chunked.score(items), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-5)


def test_temperature_top_k_and_candidates_per_item(scorer, reference_model):
    rng = np.random.default_rng(2)
    V = scorer.info.vocab_size
    a = ScoreItem(
        random_ids(rng, 12, V),
        4,
        top_k=3,
        temperature=0.7,
        candidates=rng.integers(0, V, size=(8, 5)).astype(np.int32),
    )  # [rows, C]
    b = ScoreItem(
        random_ids(rng, 6, V), 1, top_k=10, temperature=1.0, candidates=np.array([0, V - 1], dtype=np.int32)
    )  # [C]: the same ids on every row
    c = ScoreItem(random_ids(rng, 7, V), 3, top_k=1, temperature=2.5)
    ra, rb, rc = scorer.score([a, b, c])
    for it, r in ((a, ra), (b, rb), (c, rc)):
        ref = reference_rows(reference_model, it.token_ids, it.score_from, it.temperature)
        assert r.topk_ids.shape == (it.rows, it.top_k)
        assert_topk(r.topk_ids, r.topk_logprobs, ref, atol=1e-4)
        np.testing.assert_allclose(
            r.target_logprobs, ref[np.arange(it.rows), it.token_ids[it.score_from :]], atol=1e-4
        )
    np.testing.assert_allclose(
        ra.candidate_logprobs,
        np.take_along_axis(
            reference_rows(reference_model, a.token_ids, 4, 0.7), a.candidates.astype(np.int64), 1
        ),
        atol=1e-4,
    )
    ref_b = reference_rows(reference_model, b.token_ids, 1)
    assert rb.candidate_logprobs.shape == (5, 2)
    np.testing.assert_allclose(rb.candidate_logprobs, ref_b[:, [0, V - 1]], atol=1e-4)
    assert rc.candidate_logprobs is None
    # full-vocabulary normalisation: the top-K mass is below 1 and the top-1 of a flat temperature is less sure
    assert np.all(np.exp(rb.topk_logprobs).sum(1) <= 1 + 1e-5)


def test_top_k_equal_to_vocab_is_the_whole_distribution(scorer):
    V = scorer.info.vocab_size
    it = ScoreItem(np.arange(10, dtype=np.int32) % V, 5, top_k=V)
    (r,) = scorer.score([it])
    np.testing.assert_allclose(np.exp(r.topk_logprobs).sum(1), 1.0, atol=1e-5)
    assert sorted(r.topk_ids[0].tolist()) == list(range(V))


def test_info_describes_model_and_tokenizer(scorer, model_dir):
    tok = build_char_tokenizer()
    assert scorer.info.vocab_size == len(tok)
    assert scorer.info.tokenizer_sha256 == vocab_sha256(tok)
    assert set(scorer.info.special_token_ids) == set(tok.all_special_ids)
    assert (
        scorer.info.backend == "hf" and scorer.info.supports_candidates and scorer.info.supports_temperature
    )
    other = build_char_tokenizer(alphabet="abc")
    assert vocab_sha256(other) != vocab_sha256(tok)
