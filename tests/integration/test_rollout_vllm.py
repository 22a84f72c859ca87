"""Rollout service, vllm backend, as a real `opd rollout serve` subprocess: same sampling semantics as hf
(greedy outputs, behaviour logprobs, nucleus, seeds, stops) and weight swaps through the worker extension,
which land between decoding steps of the generations in flight (paused with mode="keep", not drained).

One engine for the module (vLLM on CPU takes tens of seconds to start). Tests that change the weights put
weights A back (at a higher version) before they end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama, save_model
from services.common.hf_models import load_causal_lm
from services.rollout.client import RolloutClient, RolloutError, state_dict_to_safetensors
from services.rollout.engine import state_sha256
from services.rollout.hf_engine import sample_rows
from services.rollout.protocol import GenerateRequest, Sample

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "vllm-test-token"
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [20, 21, 22, 23, 24, 25, 26]]
STEPS = 12
GREEDY = GenerateRequest(prompts=PROMPTS, n=2, max_new_tokens=STEPS, top_p=1e-6, stop_token_ids=[])


def make_peaked_llama(path, seed: int, tokenizer):
    """A tiny Llama with a scaled-up output layer: clear argmax margins, so kernels cannot flip greedy picks."""
    make_tiny_llama(path, seed=seed, tokenizer=tokenizer)
    model = load_causal_lm(path).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    save_model(model, tokenizer, path)
    return model


def hf_greedy(model) -> list[list[int]]:
    rows = sample_rows(
        model,
        PROMPTS,
        list(range(len(PROMPTS))),
        [torch.Generator().manual_seed(0) for _ in PROMPTS],
        max_new_tokens=STEPS,
        temperature=1.0,
        top_p=1e-6,
        stop_token_ids=[],
    )
    return [r.token_ids for r in rows]


@torch.no_grad()
def recomputed_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | c_t) of `model` over the whole prefix, from one forward pass without a cache: [L]."""
    seq = torch.tensor([prompt + completion])
    logp_L_V = torch.log_softmax(model(seq).logits[0].float(), -1)[len(prompt) - 1 : -1]
    return logp_L_V.gather(1, torch.tensor(completion)[:, None])[:, 0]


def sampled_by(sample: Sample, prompt: list[int], candidates: dict) -> list[str]:
    """For each token, the candidate (hf) model whose log-softmax over the whole prefix equals its
    behaviour logprob, to vLLM's CPU kernels' precision (the models differ by far more); "" where both do."""
    got = torch.tensor(sample.logprobs)
    match = {
        name: (got - recomputed_logprobs(m, prompt, sample.token_ids)).abs() < 2e-3
        for name, m in candidates.items()
    }
    labels = []
    for t in range(len(got)):
        names = [name for name, ok in match.items() if ok[t]]
        assert names, f"token {t}: behaviour logprob matches neither model"
        labels.append(names[0] if len(names) == 1 else "")  # "": both agree there (e.g. a near-sure token)
    return labels


def runs(labels: list[str]) -> list[str]:
    """The sequence of distinct models along the sample (tokens both models explain are skipped)."""
    known = [x for x in labels if x]
    return [x for i, x in enumerate(known) if i == 0 or known[i - 1] != x]


def outputs(resp) -> list[list[int]]:
    by_prompt = [[s.token_ids for s in resp.samples if s.prompt_index == i] for i in range(len(PROMPTS))]
    assert all(len(rows) == 2 and rows[0] == rows[1] for rows in by_prompt)
    return [rows[0] for rows in by_prompt]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    tok = build_char_tokenizer()
    a, b = make_peaked_llama(root / "a", 0, tok), make_peaked_llama(root / "b", 1, tok)
    port = free_port()
    log_path = root / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OPD_WEIGHTS_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "launcher.cli", "rollout", "serve", "--backend", "vllm", "--model", str(root / "a"),
           "--port", str(port), "--dtype", "float32", "--vllm-gpu-memory-utilization", "0.1",
           "--vllm-enforce-eager", "--max-model-len", "256", "--max-batch-size", "256"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = RolloutClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=120)
    try:
        deadline = time.monotonic() + 300
        while not client.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("vLLM rollout server did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(0.5)
        yield dict(client=client, a=a, b=b, root=root, tok=tok, url=f"http://127.0.0.1:{port}",
                   sd_a=load_file(root / "a" / "model.safetensors"), sd_b=load_file(root / "b" / "model.safetensors"),
                   greedy_a=hf_greedy(a), greedy_b=hf_greedy(load_causal_lm(root / "b")))  # fmt: skip
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def restore_a(stack) -> None:
    client = stack["client"]
    client.load_weights(str(stack["root"] / "a"), client.weights().version + 1)


def test_greedy_agrees_with_hf(stack):
    assert stack["greedy_a"] != stack["greedy_b"]
    resp = stack["client"].generate(GREEDY)
    assert outputs(resp) == stack["greedy_a"]
    assert all(s.finish_reason == "length" for s in resp.samples)


def test_behaviour_logprobs_are_the_full_temperature_one_distribution(stack):
    client, model = stack["client"], stack["a"]
    resp = client.generate(
        GenerateRequest(
            prompts=PROMPTS, n=3, max_new_tokens=8, temperature=0.7, top_p=0.8, seed=1, return_top_k=3
        )
    )
    for s in resp.samples:
        prompt = PROMPTS[s.prompt_index]
        with torch.no_grad():
            logits_T_V = model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1 : -1]
        logp_T_V = torch.log_softmax(logits_T_V, -1)
        want = logp_T_V.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=2e-3, rtol=0)
        top_lp, top_id = logp_T_V.topk(3, -1)
        assert s.top_ids == top_id.tolist()
        torch.testing.assert_close(torch.tensor(s.top_logprobs), top_lp, atol=2e-3, rtol=0)


def test_nucleus_seed_and_stop_semantics(stack):
    client, model = stack["client"], stack["a"]
    prompt = PROMPTS[0]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for v in order:
        if mass >= 0.5:
            break
        nucleus.append(v)
        mass += float(probs[v])
    assert len(nucleus) >= 2
    req = GenerateRequest(prompts=[prompt] * 4, n=200, max_new_tokens=1, top_p=0.5, seed=9)
    first = [s.token_ids[0] for s in client.generate(req).samples]
    assert set(first) <= set(nucleus) and len(set(first)) >= 2
    seeded = GenerateRequest(prompts=PROMPTS, n=3, max_new_tokens=10, top_p=0.9, seed=77)
    assert client.generate(seeded).samples == client.generate(seeded).samples
    other = client.generate(seeded.model_copy(update={"seed": 78}))
    assert [s.token_ids for s in other.samples] != [s.token_ids for s in client.generate(seeded).samples]
    # vLLM seeds sample j of an n-sample request with seed + j: a request of n = 1 with first_sample_index j
    # gives sample j of the n = 3 one (the pipelined worker's G requests of n = 1 are one group)
    whole = client.generate(seeded).samples
    for j in range(3):
        one = client.generate(seeded.model_copy(update={"n": 1, "first_sample_index": j})).samples
        want = [[s for s in whole if s.prompt_index == i][j] for i in range(len(PROMPTS))]
        assert [s.token_ids for s in one] == [s.token_ids for s in want]
    stop = stack["greedy_a"][0][3]
    stopped = client.generate(
        GenerateRequest(prompts=[prompt], max_new_tokens=STEPS, top_p=1e-6, stop_token_ids=[stop])
    )
    (s,) = stopped.samples
    greedy = stack["greedy_a"][0]
    assert s.token_ids == greedy[: greedy.index(stop) + 1] and s.finish_reason == "stop"


def test_bad_requests_are_422(stack):
    client = stack["client"]
    for req, reason in [
        (GenerateRequest(prompts=[[5, 5000]]), "outside [0, 85)"),
        (GenerateRequest(prompts=[[5] * 250], max_new_tokens=10), "exceeds max_model_len 256"),
    ]:
        with pytest.raises(RolloutError) as err:
            client.generate(req)
        assert err.value.status_code == 422 and reason in err.value.detail


def test_weight_swap_serves_the_new_model_and_refusals_change_nothing(stack):
    client = stack["client"]
    v = client.weights().version
    info = client.put_weights(stack["b"].state_dict(), v + 1)
    assert info.sha256 == state_sha256(stack["sd_b"], stack["sd_b"])
    resp = client.generate(GREEDY)
    assert resp.policy_version == v + 1 and outputs(resp) == stack["greedy_b"]
    served = client.weights()
    body_a = state_dict_to_safetensors(stack["sd_a"])
    with RolloutClient(stack["url"], token="wrong") as wrong:
        for call, status in [
            (lambda: wrong.put_weights(body_a, v + 5), 401),
            (lambda: client.put_weights(body_a, v + 1), 409),
            (lambda: client.put_weights({k: t.bfloat16() for k, t in stack["sd_a"].items()}, v + 5), 422),
            (lambda: client.put_weights(b"\0" * 64, v + 5), 422),
            (lambda: client.load_weights(str(stack["root"] / "missing"), v + 5), 422),
        ]:
            with pytest.raises(RolloutError) as err:
                call()
            assert err.value.status_code == status
            assert client.weights() == served
    assert outputs(client.generate(GREEDY)) == stack["greedy_b"]
    info = client.load_weights(str(stack["root"] / "a"), v + 2)
    assert info.sha256 == state_sha256(stack["sd_a"], stack["sd_a"])
    assert outputs(client.generate(GREEDY)) == stack["greedy_a"]


def test_concurrent_generation_never_sees_a_mix(stack):
    """Swaps land between decoding steps: a sample with one version is that version's greedy output; one
    spanning versions was sampled token by token by A or B over the whole prefix (vLLM drops the KV cache
    at the swap), starting with its first token's version's weights and ending with its last's."""
    client = stack["client"]
    bodies = {"a": state_dict_to_safetensors(stack["sd_a"]), "b": state_dict_to_safetensors(stack["sd_b"])}
    start = client.weights().version
    weights_of = {start: "a"}
    seen: list = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        try:
            while not stop.is_set():
                seen.append(client.generate(GREEDY))
        except BaseException as e:
            errors.append(e)
            raise

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for version in range(start + 1, start + 7):
            name = "b" if (version - start) % 2 else "a"
            weights_of[version] = name
            client.put_weights(bodies[name], version)
            deadline = time.monotonic() + 30
            while (
                not any(r.samples[-1].first_token_version == version for r in seen)
                and not errors
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert {s.first_token_version for r in seen for s in r.samples} >= set(range(start + 1, start + 7))
    candidates = {"a": stack["a"], "b": stack["b"]}
    for resp in seen:
        assert resp.policy_version == min(s.first_token_version for s in resp.samples)
        for s in resp.samples:
            first, last = s.first_token_version, s.last_token_version
            assert first <= last
            if first == last:
                want = stack[f"greedy_{weights_of[first]}"][s.prompt_index]
                assert s.token_ids == want, f"version {first} served a mix"
                continue
            changes = runs(sampled_by(s, PROMPTS[s.prompt_index], candidates))
            assert changes[0] == weights_of[first] and changes[-1] == weights_of[last], (first, last, changes)
            assert len(changes) - 1 <= last - first, (first, last, changes)
    restore_a(stack)


def test_a_push_lands_mid_generation_without_waiting_for_it(stack):
    """Long generations (96 samples of 240 new tokens) are in flight when B is pushed: the push returns
    before they end; they continue under B; samples in flight start at the old version and end at the new
    one, each token's logprob being A's then B's log-softmax over its whole prefix (one change); the
    response says the old version."""
    client = stack["client"]
    v = client.weights().version
    body_b = state_dict_to_safetensors(stack["sd_b"])
    request = GenerateRequest(prompts=PROMPTS, n=32, max_new_tokens=240, top_p=0.9, seed=5, stop_token_ids=[])
    result: dict = {}

    def generate() -> None:
        result["response"] = client.generate(request)
        result["done"] = time.monotonic()

    thread = threading.Thread(target=generate)
    start = time.monotonic()
    thread.start()
    time.sleep(0.2)
    client.put_weights(body_b, v + 1)
    pushed = time.monotonic()
    thread.join(120)
    assert pushed < result["done"], (pushed - start, result["done"] - start)
    resp = result["response"]
    assert resp.policy_version == v
    candidates = {"a": stack["a"], "b": stack["b"]}
    weights_of = {v: "a", v + 1: "b"}
    spans = [(s.first_token_version, s.last_token_version) for s in resp.samples]
    assert (v, v + 1) in spans and set(spans) <= {
        (v, v),
        (v, v + 1),
        (v + 1, v + 1),
    }  # a prompt may start late
    for s, (first, last) in zip(resp.samples, spans, strict=True):
        changes = runs(sampled_by(s, PROMPTS[s.prompt_index], candidates))
        assert changes == list(dict.fromkeys([weights_of[first], weights_of[last]])), (first, last, changes)
    restore_a(stack)
