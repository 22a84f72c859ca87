"""hf sampling loop: top-p against a reference written from the definition, the KV-cache loop against
naive full-recompute decoding, behaviour logprobs, stop handling, batching independence, a weight swap
between two decoding steps."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.tiny_models import make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.rollout.engine import GenerateParams
from services.rollout.hf_engine import (
    GenerationCancelled,
    WeightsGate,
    sample_groups,
    sample_requests,
    sample_rows,
    top_p_sample,
)


def reference_nucleus(logits: list[float], temperature: float, top_p: float) -> dict[int, float]:
    """The top-p distribution from the definition: tokens by descending probability (ties: lower id first),
    kept while the mass before them is < top_p (the first always), renormalised."""
    z = [x / temperature for x in logits]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    probs = [x / sum(w) for x in w]
    kept: dict[int, float] = {}
    mass = 0.0
    for v in sorted(range(len(probs)), key=lambda v: (-probs[v], v)):
        if kept and mass >= top_p:
            break
        kept[v] = probs[v]
        mass += probs[v]
    total = sum(kept.values())
    return {v: p / total for v, p in kept.items()}


def inverse_cdf_counts(logits: list[float], temperature: float, top_p: float, n: int) -> dict[int, int]:
    """Feed a uniform grid u_k = (k + 1/2) / n: the counts are n * q_v up to one per token."""
    logits_B_V = torch.tensor([logits] * n)
    u_B = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ids = top_p_sample(logits_B_V, temperature, top_p, u_B).tolist()
    return {v: ids.count(v) for v in set(ids)}


@pytest.mark.parametrize(
    "logits,temperature,top_p",
    [
        ([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], 1.0, 0.9),
        ([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], 1.0, 1.0),
        ([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], 0.5, 0.7),
        ([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], 2.5, 0.95),
        ([0.3, 0.3, 0.3, 0.3], 1.0, 0.6),  # ties: the lower ids form the nucleus
        ([5.0, -2.0, 1.0, 4.9, 0.0, 0.0, 3.0], 1.3, 0.8),
    ],
)
def test_top_p_sample_matches_reference_distribution(logits, temperature, top_p):
    n = 4000
    want = reference_nucleus(logits, temperature, top_p)
    got = inverse_cdf_counts(logits, temperature, top_p, n)
    assert set(got) == {v for v, q in want.items() if q * n >= 1}
    for v, q in want.items():
        assert abs(got.get(v, 0) - q * n) <= 1.0, (v, got.get(v, 0), q * n)


def test_top_p_boundary_is_inclusive_of_the_token_that_reaches_p():
    # probs 0.5, 0.3, 0.2: p = 0.5 is reached by the first token alone; just above 0.5 needs the second
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert set(inverse_cdf_counts(logits, 1.0, 0.5 - 1e-6, 1000)) == {0}
    assert set(inverse_cdf_counts(logits, 1.0, 0.5 + 1e-6, 1000)) == {0, 1}
    assert set(inverse_cdf_counts(logits, 1.0, 0.8 + 1e-6, 1000)) == {0, 1, 2}


def test_tiny_top_p_is_argmax_with_lowest_id_on_ties():
    g = torch.Generator().manual_seed(0)
    logits_B_V = torch.randn(64, 50, generator=g)
    logits_B_V[0, [3, 7]] = 100.0  # a tie at the top: argmax convention picks id 3
    u_B = torch.rand(64, generator=g, dtype=torch.float64)
    ids = top_p_sample(logits_B_V, 1.0, 1e-6, u_B)
    assert torch.equal(ids, logits_B_V.argmax(-1))
    assert ids[0] == 3


def test_u_at_the_top_edge_never_picks_a_token_outside_the_nucleus():
    logits_B_V = torch.tensor([[3.0, 2.0, 1.0, -50.0]] * 3)
    u_B = torch.tensor([0.0, 1.0 - 1e-16, 1.0 - 1e-12], dtype=torch.float64)
    ids = top_p_sample(logits_B_V, 1.0, 0.5, u_B)
    assert ids.tolist() == [0, 0, 0]  # the nucleus at p=0.5 is {0} (its prob is 0.66)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=3)
    m = load_causal_lm(path).eval()
    with torch.no_grad():  # spread the logits so argmax has clear margins
        m.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    return m


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]  # different lengths: exercises left padding


@torch.no_grad()
def naive_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Argmax decoding recomputing the full, unpadded sequence every step (no cache)."""
    seq, lps = list(prompt), []
    for _ in range(steps):
        logits_V = model(torch.tensor([seq])).logits[0, -1]
        t = int(logits_V.argmax())
        lps.append(float(torch.log_softmax(logits_V, -1)[t]))
        seq.append(t)
    return seq[len(prompt) :], lps


@torch.no_grad()
def naive_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | c_t) at temperature 1 over the full vocabulary, from one forward pass."""
    seq = torch.tensor([prompt + completion])
    logp_T_V = torch.log_softmax(model(seq).logits[0].float(), -1)[len(prompt) - 1 : -1]
    return logp_T_V.gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_kv_cache_loop_equals_naive_argmax_decoding(model):
    steps = 12
    rows = sample_rows(
        model,
        PROMPTS,
        [0, 1, 1, 2],
        [torch.Generator().manual_seed(i) for i in range(4)],
        max_new_tokens=steps,
        temperature=1.0,
        top_p=1e-6,
        stop_token_ids=[],
    )
    for row, p in zip(rows, [0, 1, 1, 2], strict=True):
        want_ids, want_lps = naive_greedy(model, PROMPTS[p], steps)
        assert row.token_ids == want_ids
        assert row.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(row.logprobs), torch.tensor(want_lps), atol=1e-4, rtol=0)


def test_behaviour_logprobs_are_full_distribution_at_temperature_one(model):
    # sampled with temperature 0.6 and top_p 0.7, the logprobs must still be the untempered, untruncated ones
    rows = sample_rows(
        model,
        PROMPTS,
        [0, 1, 2, 2],
        [torch.Generator().manual_seed(10 + i) for i in range(4)],
        max_new_tokens=10,
        temperature=0.6,
        top_p=0.7,
        stop_token_ids=[],
        return_top_k=3,
    )
    for row, p in zip(rows, [0, 1, 2, 2], strict=True):
        want = naive_logprobs(model, PROMPTS[p], row.token_ids)
        torch.testing.assert_close(torch.tensor(row.logprobs), want, atol=1e-4, rtol=0)
        seq = torch.tensor([PROMPTS[p] + row.token_ids])
        logp_T_V = torch.log_softmax(model(seq).logits[0], -1)[len(PROMPTS[p]) - 1 : -1]
        top_lp_T_K, top_id_T_K = logp_T_V.topk(3, -1)
        assert row.top_ids == top_id_T_K.tolist()
        torch.testing.assert_close(torch.tensor(row.top_logprobs), top_lp_T_K, atol=1e-4, rtol=0)
    assert any(lp < math.log(0.3) for row in rows for lp in row.logprobs)  # not renormalised in the nucleus


def test_stop_token_ends_the_row_and_is_included(model):
    greedy, _ = naive_greedy(model, PROMPTS[0], 6)
    stop = greedy[3]
    first = greedy.index(stop)
    rows = sample_rows(
        model,
        [PROMPTS[0], PROMPTS[1]],
        [0, 1],
        [torch.Generator().manual_seed(i) for i in range(2)],
        max_new_tokens=6,
        temperature=1.0,
        top_p=1e-6,
        stop_token_ids=[stop],
    )
    assert rows[0].token_ids == greedy[: first + 1]
    assert rows[0].finish_reason == "stop"
    assert len(rows[0].logprobs) == len(rows[0].token_ids)
    other, _ = naive_greedy(model, PROMPTS[1], 6)
    if stop not in other:  # the other row runs on after its neighbour stopped (batch compaction)
        assert rows[1].token_ids == other and rows[1].finish_reason == "length"


def test_samples_depend_on_the_generator_not_on_the_batch(model):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, stop_token_ids=[])
    alone = sample_rows(model, [PROMPTS[1]], [0], [torch.Generator().manual_seed(42)], **kw)
    mixed = sample_rows(
        model,
        PROMPTS,
        [0, 1, 2, 1],
        [torch.Generator().manual_seed(s) for s in (1, 42, 2, 3)],
        **kw,
    )
    assert mixed[1].token_ids == alone[0].token_ids
    assert mixed[3].token_ids != mixed[1].token_ids  # same prompt, other seed: a different sample


class SwapAtStep(WeightsGate):
    """A gate that installs `new_model`'s weights (as version 1) just before forward number `at` (0 = the
    prefill): tokens 0..at-1 are then sampled by the old weights, tokens at.. by the new ones."""

    def __init__(self, live_model, new_model, at: int) -> None:
        super().__init__(version=0)
        self.targets, self.new, self.at, self.forwards = (
            live_model.state_dict(keep_vars=True),
            new_model,
            at,
            0,
        )

    def step(self):
        if self.forwards == self.at:
            state = {k: v.detach().clone() for k, v in self.new.state_dict().items()}
            self.install(1, lambda: [setattr(self.targets[k], "data", state[k]) for k in self.targets])
        self.forwards += 1
        return super().step()


def peaked_llama(tmp_path, seed: int):
    m = load_causal_lm(make_tiny_llama(tmp_path / f"m{seed}", seed=seed)).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return m


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1e-6), (0.7, 0.9)])
def test_a_swap_mid_generation_labels_tokens_and_their_logprobs_by_the_weights_that_sampled_them(
    tmp_path, temperature, top_p
):
    """Behaviour logprobs are the ones actually sampled from: before the swap log_softmax of the old model,
    after it the new model's over the whole prefix (the step after a swap re-prefills, so no old-weight KV
    entry feeds a new-version token). Rows of different prompt lengths and a row that stops early check
    the re-prefill's padding and the batch compaction around it."""
    old, new = peaked_llama(tmp_path, 3), peaked_llama(tmp_path, 4)
    live = peaked_llama(tmp_path, 3)  # decodes; its weights are replaced mid-way
    steps, at = 14, 6
    greedy_first, _ = naive_greedy(old, PROMPTS[2], at)
    rows = sample_rows(
        live,
        PROMPTS,
        [0, 1, 2, 1],
        [torch.Generator().manual_seed(i) for i in range(4)],
        max_new_tokens=steps,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=[greedy_first[2]] if top_p < 0.5 else [],  # greedy: row 2 stops before the swap
        gate=SwapAtStep(live, new, at),
    )
    spanning = 0
    for row, p in zip(rows, [0, 1, 2, 1], strict=True):
        n = len(row.token_ids)
        assert row.versions == [0] * min(n, at) + [1] * (n - at)
        want_old = naive_logprobs(old, PROMPTS[p], row.token_ids)
        want_new = naive_logprobs(new, PROMPTS[p], row.token_ids)
        got = torch.tensor(row.logprobs)
        torch.testing.assert_close(got[:at], want_old[:at], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[at:], want_new[at:], atol=1e-4, rtol=0)
        if n > at:
            spanning += 1
            assert (got[at:] - want_old[at:]).abs().max() > 1e-2  # the two models do differ there
    assert spanning >= 3
    if top_p < 0.5:
        assert rows[2].finish_reason == "stop" and len(rows[2].token_ids) <= at


def test_sample_groups_reports_first_and_last_token_versions(tmp_path):
    old, new = peaked_llama(tmp_path, 3), peaked_llama(tmp_path, 4)
    params = GenerateParams(
        n=2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=0, stop_token_ids=[], return_top_k=0
    )
    samples = sample_groups(old, PROMPTS, params, max_batch_size=4, gate=SwapAtStep(old, new, 3))
    # rows 0-3 (prompts 0 and 1) decode in the first batch, across the swap; rows 4-5 after it
    assert [(s.first_token_version, s.last_token_version) for s in samples] == [(0, 1)] * 4 + [(1, 1)] * 2


def _params(n: int, seed: int, first: int = 0, max_new_tokens: int = 10) -> GenerateParams:
    return GenerateParams(
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=0.9,
        seed=seed,
        stop_token_ids=[],
        return_top_k=0,
        first_sample_index=first,
    )


def test_decoding_runs_in_inference_mode(tmp_path):
    """No autograd graph behind a generation: every forward of the loop runs under inference mode."""
    model = peaked_llama(tmp_path, 3)
    modes: list[bool] = []
    model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    sample_groups(model, PROMPTS, _params(2, 0, max_new_tokens=4), max_batch_size=8)
    assert modes and all(modes)


def test_requests_decoded_together_give_what_each_gives_alone(tmp_path):
    """The hf engine decodes waiting requests as one batch: each request's samples are those it gets alone,
    and the n = 1 request for sample j of a group is that group's sample j (one prefill for their prompt)."""
    model = peaked_llama(tmp_path, 3)
    requests = [
        (PROMPTS[:2], _params(2, seed=5)),
        ([PROMPTS[0]], _params(1, seed=5, first=1)),
        ([PROMPTS[2]], _params(3, seed=9)),
        ([PROMPTS[0]], _params(1, seed=5, first=0)),
    ]
    prefills: list[int] = []
    model.register_forward_hook(
        lambda _m, args, kw, _out: prefills.append(1) if kw.get("past_key_values") is None else None,
        with_kwargs=True,
    )
    together = sample_requests(model, requests, max_batch_size=16)
    assert len(prefills) == 1  # one batch: its three distinct prompts prefilled in one forward
    for (ids, params), got in zip(requests, together, strict=True):
        alone = sample_groups(model, ids, params, max_batch_size=16)
        assert [s.token_ids for s in got] == [s.token_ids for s in alone]
        assert [s.prompt_index for s in got] == [s.prompt_index for s in alone]
        for a, b in zip(got, alone, strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert together[1][0].token_ids == together[0][1].token_ids  # sample 1 of prompt 0
    assert together[3][0].token_ids == together[0][0].token_ids  # sample 0 of prompt 0
    with pytest.raises(ValueError, match="batch_key"):
        sample_requests(model, [requests[0], ([PROMPTS[0]], _params(1, 5, max_new_tokens=3))], 16)


class CancelAtStep(WeightsGate):
    """Sets `event` just before forward number `at` (0 = the prefill)."""

    def __init__(self, event, at: int) -> None:
        super().__init__(version=0)
        self.event, self.at, self.forwards = event, at, 0

    def step(self):
        if self.forwards == self.at:
            self.event.set()
        self.forwards += 1
        return super().step()


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(tmp_path):
    model = peaked_llama(tmp_path, 3)
    kept, dropped = _params(2, seed=1, max_new_tokens=12), _params(2, seed=2, max_new_tokens=12)
    batch = [(PROMPTS[:1], kept), (PROMPTS[1:2], dropped)]
    out = sample_requests(model, batch, max_batch_size=8, gate=CancelAtStep(dropped.cancel, 4))
    assert [len(s.token_ids) for s in out[0]] == [12, 12]  # the other request runs to its end
    assert [s.token_ids for s in out[0]] == [
        s.token_ids for s in sample_groups(model, PROMPTS[:1], _params(2, 1, max_new_tokens=12), 8)
    ]
    assert all(len(s.token_ids) <= 5 for s in out[1])  # the abandoned rows stopped decoding at once
    with pytest.raises(GenerationCancelled):
        everyone = _params(2, seed=1, max_new_tokens=12)
        sample_requests(model, [(PROMPTS[:1], everyone)], 8, gate=CancelAtStep(everyone.cancel, 3))
