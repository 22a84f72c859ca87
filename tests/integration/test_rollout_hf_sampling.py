"""Rollout service, hf backend, over real HTTP: top-p semantics, seeds, behaviour logprobs, errors, probes."""

from __future__ import annotations

import math
import time

import httpx
import numpy as np
import pytest
import torch

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama, save_model
from services.common.hf_models import load_causal_lm
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, RolloutError
from services.rollout.config import RolloutConfig
from services.rollout.protocol import GenerateRequest
from services.rollout.server import running_server

pytestmark = pytest.mark.integration

ALPHABET = "abcdefgh"  # 5 specials + 8 characters: a 13-token vocabulary, small enough for chi-square
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}:{% endif %}"
)
PROMPT = "abcab"


def make_peaked_llama(path, seed: int, lm_head_std: float, tokenizer):
    """A tiny Llama whose output layer is scaled up: a spread next-token distribution, clear argmax margins."""
    make_tiny_llama(path, seed=seed, tokenizer=tokenizer)
    model = load_causal_lm(path).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, lm_head_std, generator=torch.Generator().manual_seed(seed))
    save_model(model, tokenizer, path)
    return model


def chi2_critical(dof: int, z: float = 3.0902) -> float:
    """Upper chi-square quantile by the Wilson-Hilferty approximation (z = 3.0902: alpha = 1e-3).
    For dof = 12 it gives 33.07 against the table's 32.91 (chi2_{0.999}(12)); within 1% for dof >= 3."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2_statistic(counts: dict[int, int], probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic; categories expecting < 5 are pooled into one bin. Returns (statistic, dof)."""
    expected = (probs.double() * n).tolist()
    big = [v for v, e in enumerate(expected) if e >= 5]
    bins = [(counts.get(v, 0), expected[v]) for v in big]
    rest_obs = sum(c for v, c in counts.items() if v not in big)
    rest_exp = sum(e for v, e in enumerate(expected) if v not in big)
    if rest_exp >= 5:
        bins.append((rest_obs, rest_exp))
    else:
        assert rest_obs <= 5, "tokens the distribution makes (nearly) impossible were sampled"
    return sum((o - e) ** 2 / e for o, e in bins), len(bins) - 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = build_char_tokenizer(ALPHABET)
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("rollout") / "student"
    model = make_peaked_llama(path, seed=0, lm_head_std=0.15, tokenizer=tok)
    cfg = RolloutConfig(model=str(path), port=0, max_batch_size=512, seed=1)
    with running_server(build_app(cfg)) as url, RolloutClient(url) as client:
        client.wait_ready(60)
        yield dict(url=url, client=client, model=model, tok=tok)


@torch.no_grad()
def first_token_probs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(model(torch.tensor([ids])).logits[0, -1] / temperature, -1)


def first_tokens(
    client: RolloutClient, ids: list[int], top_p: float, total: int, seed: int
) -> dict[int, int]:
    n = 250
    resp = client.generate(
        GenerateRequest(prompts=[ids] * (total // n), n=n, max_new_tokens=1, top_p=top_p, seed=seed)
    )
    counts: dict[int, int] = {}
    for s in resp.samples:
        counts[s.token_ids[0]] = counts.get(s.token_ids[0], 0) + 1
    return counts


def test_tiny_top_p_is_greedy_argmax_decoding(served):
    client, model, tok = served["client"], served["model"], served["tok"]
    texts = ["abcab", "h", "gfedcbaa"]
    resp = client.generate(
        GenerateRequest(texts=texts, n=2, max_new_tokens=12, top_p=1e-6, stop_token_ids=[])
    )
    assert resp.prompt_ids == [tok(t)["input_ids"] for t in texts]
    assert [s.prompt_index for s in resp.samples] == [0, 0, 1, 1, 2, 2]
    for s in resp.samples:
        seq = list(resp.prompt_ids[s.prompt_index])
        with torch.no_grad():
            for t in s.token_ids:  # naive argmax decoding, full recompute, no padding
                assert t == int(model(torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(t)
        assert len(s.token_ids) == 12 and s.finish_reason == "length"


def test_top_p_one_samples_the_full_distribution(served):
    client, model, tok = served["client"], served["model"], served["tok"]
    ids = tok(PROMPT)["input_ids"]
    total = 4000
    counts = first_tokens(client, ids, top_p=1.0, total=total, seed=11)
    probs = first_token_probs(model, ids)
    stat, dof = chi2_statistic(counts, probs, total)
    assert dof >= 8
    assert stat < chi2_critical(dof), (stat, dof, counts)
    # the test has power: the same counts are far from a slightly different distribution
    wrong, wrong_dof = chi2_statistic(counts, first_token_probs(model, ids, temperature=1.3), total)
    assert wrong > chi2_critical(wrong_dof)


def test_top_p_half_never_leaves_the_nucleus_and_renormalises(served):
    client, model, tok = served["client"], served["model"], served["tok"]
    ids = tok(PROMPT)["input_ids"]
    probs = first_token_probs(model, ids)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for v in order:  # from the definition: smallest top set with mass >= 0.5
        if mass >= 0.5:
            break
        nucleus.append(v)
        mass += float(probs[v])
    assert 2 <= len(nucleus) < len(order) - 3  # a real truncation with several tokens inside
    total = 2000
    counts = first_tokens(client, ids, top_p=0.5, total=total, seed=5)
    assert set(counts) <= set(nucleus), (counts, nucleus)
    inside = torch.zeros_like(probs)
    inside[nucleus] = probs[nucleus] / probs[nucleus].sum()
    stat, dof = chi2_statistic(counts, inside, total)
    assert stat < chi2_critical(max(dof, 1))


def test_same_seed_same_samples(served):
    client = served["client"]
    req = GenerateRequest(texts=["abc", "ddd"], n=4, max_new_tokens=16, top_p=0.9, seed=1234)
    a, b = client.generate(req), client.generate(req)
    assert a.samples == b.samples
    other = client.generate(req.model_copy(update={"seed": 1235}))
    assert [s.token_ids for s in other.samples] != [s.token_ids for s in a.samples]
    unseeded = req.model_copy(update={"seed": None})
    assert [s.token_ids for s in client.generate(unseeded).samples] != [
        s.token_ids for s in client.generate(unseeded).samples
    ]
    assert len({tuple(s.token_ids) for s in a.samples}) > 1  # the n samples of one prompt differ


def test_first_sample_index_gives_the_samples_of_one_larger_request(served):
    """A group's G samples sent as G requests of n = 1 (the pipelined worker) are one n = G request's."""
    client = served["client"]
    req = GenerateRequest(texts=["abc", "ddd"], n=4, max_new_tokens=16, top_p=0.9, seed=77)
    whole = client.generate(req).samples
    by_prompt = [[s for s in whole if s.prompt_index == i] for i in range(2)]

    def same(got, want):  # same tokens; log-probs up to the batch's float summation order
        assert [s.token_ids for s in got] == [s.token_ids for s in want]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)

    for j in range(4):
        one = client.generate(req.model_copy(update={"n": 1, "first_sample_index": j})).samples
        same(one, [by_prompt[0][j], by_prompt[1][j]])
    tail = client.generate(req.model_copy(update={"n": 2, "first_sample_index": 2})).samples
    same(tail, by_prompt[0][2:] + by_prompt[1][2:])
    assert len({tuple(s.token_ids) for s in by_prompt[0]}) > 1  # the samples differ: the index matters


def test_behaviour_logprobs_are_untempered_untruncated_log_softmax(served):
    client, model = served["client"], served["model"]
    resp = client.generate(
        GenerateRequest(
            texts=["abcab", "hh"], n=3, max_new_tokens=10, temperature=0.7, top_p=0.8, return_top_k=4
        )
    )
    for s in resp.samples:
        prompt = resp.prompt_ids[s.prompt_index]
        with torch.no_grad():
            logits_T_V = model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1 : -1]
        logp_T_V = torch.log_softmax(logits_T_V, -1)
        want = logp_T_V.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)
        top_lp, top_id = logp_T_V.topk(4, -1)
        assert s.top_ids == top_id.tolist()
        torch.testing.assert_close(torch.tensor(s.top_logprobs), top_lp, atol=1e-4, rtol=0)


def test_default_stop_is_eos_and_is_included(served):
    client, tok = served["client"], served["tok"]
    resp = client.generate(GenerateRequest(texts=["a"] * 8, n=8, max_new_tokens=40, top_p=1.0, seed=3))
    stopped = [s for s in resp.samples if s.finish_reason == "stop"]
    assert stopped, "with eos at ~10% per step some of 64 samples must stop within 40 tokens"
    for s in resp.samples:
        eos_at = [i for i, t in enumerate(s.token_ids) if t == tok.eos_token_id]
        if s.finish_reason == "stop":
            assert eos_at == [len(s.token_ids) - 1]
        else:
            assert not eos_at and len(s.token_ids) == 40
    custom = client.generate(
        GenerateRequest(texts=["a"] * 4, n=4, max_new_tokens=40, top_p=1.0, seed=3, stop_token_ids=[5, 6])
    )
    for s in custom.samples:
        assert (s.finish_reason == "stop") == (s.token_ids[-1] in (5, 6))
        assert not set(s.token_ids[:-1]) & {5, 6}


def test_chat_template_prompts(served):
    client, tok = served["client"], served["tok"]
    resp = client.generate(GenerateRequest(texts=["abc"], chat_template=True, max_new_tokens=2))
    assert resp.prompt_ids == [tok("<s>abc\n:", add_special_tokens=False)["input_ids"]]
    assert resp.prompt_ids[0][0] == tok.bos_token_id


@pytest.mark.parametrize(
    "body,reason",
    [
        ({"prompts": [[5, 99]]}, "token id 99 outside [0, 13)"),
        ({"prompts": [[-1]]}, "token id -1 outside"),
        ({"prompts": [[5] * 500], "max_new_tokens": 100}, "exceeds max_model_len 512"),
        ({"prompts": [[5]], "stop_token_ids": [13]}, "stop_token_ids: 13 outside"),
        ({"prompts": [[5]], "return_top_k": 20}, "exceeds the vocabulary size 13"),
        ({"prompts": [[5]], "chat_template": True}, "chat_template applies to `texts` only"),
        ({"texts": [""]}, "empty prompt"),
        ({"prompts": [[5]], "texts": ["a"]}, "exactly one"),
        ({"prompts": [[]]}, "empty prompt"),
        ({"prompts": [[5]], "n": 0}, "greater than or equal to 1"),
        ({"prompts": [[5]], "top_p": 0}, "greater than 0"),
        ({"prompts": [[5]], "bogus": 1}, "Extra inputs"),
    ],
)
def test_bad_generate_requests_are_422_with_the_reason(served, body, reason):
    resp = httpx.post(served["url"] + "/v1/generate", json=body)
    assert resp.status_code == 422
    assert reason in str(resp.json()["detail"])


def test_probes_and_metrics(served):
    url, client = served["url"], served["client"]
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(url + "/readyz").json() == {"status": "ready", "backend": "hf", "version": 0}
    before = client.generate(GenerateRequest(texts=["ab"], n=3, max_new_tokens=5, stop_token_ids=[]))
    assert sum(len(s.token_ids) for s in before.samples) == 15
    text = httpx.get(url + "/metrics").text
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert metrics["opd_rollout_generated_tokens_total"] >= 15
    assert metrics["opd_rollout_policy_version"] == 0
    assert metrics["opd_rollout_ready"] == 1
    assert metrics['opd_rollout_requests_total{code="200",route="/v1/generate"}'] >= 1
    assert metrics['opd_rollout_requests_total{code="422",route="/v1/generate"}'] >= 1
    assert metrics["opd_rollout_generate_latency_seconds_count"] >= 1


def test_failed_load_reports_503_everywhere(tmp_path):
    cfg = RolloutConfig(model=str(tmp_path / "no-such-model"), port=0)
    app = build_app(cfg)
    with running_server(app) as url, RolloutClient(url, retries=1) as client:
        deadline = time.monotonic() + 30
        while app.state.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.ready()
        health = httpx.get(url + "/healthz")
        assert health.status_code == 503 and "model load failed" in health.json()["detail"]
        with pytest.raises(RolloutError) as err:
            client.generate(GenerateRequest(prompts=[[1]]))
        assert err.value.status_code == 503
