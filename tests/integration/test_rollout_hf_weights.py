"""Rollout service, hf backend, over real HTTP: versioned weight updates, swaps that land between decoding
steps of the generations in flight (without draining them), refused updates."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama, save_model
from services.common.hf_models import load_causal_lm
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, RolloutError, state_dict_to_safetensors
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.hf_engine import HFEngine, WeightsGate
from services.rollout.protocol import GenerateRequest, Sample
from services.rollout.server import running_server

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [20, 21, 22, 23, 24, 25, 26]]
STEPS = 16
GREEDY = GenerateRequest(prompts=PROMPTS, n=2, max_new_tokens=STEPS, top_p=1e-6, stop_token_ids=[])


def make_peaked_llama(path, seed: int, tokenizer):
    """A tiny Llama with a scaled-up output layer, so greedy outputs have clear argmax margins."""
    make_tiny_llama(path, seed=seed, tokenizer=tokenizer)
    model = load_causal_lm(path).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    save_model(model, tokenizer, path)
    return model


@torch.no_grad()
def greedy_of(model) -> list[list[int]]:
    """Argmax decoding with full recompute, per prompt (the reference the served outputs must equal)."""
    out = []
    for p in PROMPTS:
        seq = list(p)
        for _ in range(STEPS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        out.append(seq[len(p) :])
    return out


@torch.no_grad()
def recomputed_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | c_t) of `model` over the whole prefix, from one forward pass without a cache: [L]."""
    seq = torch.tensor([prompt + completion])
    logp_L_V = torch.log_softmax(model(seq).logits[0].float(), -1)[len(prompt) - 1 : -1]
    return logp_L_V.gather(1, torch.tensor(completion)[:, None])[:, 0]


def sampled_by(sample: Sample, prompt: list[int], candidates: dict) -> list[str]:
    """For each token, the candidate model whose log-softmax over the whole prefix equals its behaviour
    logprob (the weights that sampled it); "" where both do."""
    got = torch.tensor(sample.logprobs)
    match = {
        name: (got - recomputed_logprobs(m, prompt, sample.token_ids)).abs() < 1e-4
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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    tok = build_char_tokenizer()
    a, b = make_peaked_llama(root / "a", 0, tok), make_peaked_llama(root / "b", 1, tok)
    # "fresh model loaded with the new weights": B as read back from its own checkpoint directory
    fresh_b = load_causal_lm(root / "b").eval()
    info = dict(root=root, a=a, b=b, greedy_a=greedy_of(a), greedy_b=greedy_of(fresh_b))
    assert info["greedy_a"] != info["greedy_b"]
    info["sd_a"] = load_file(root / "a" / "model.safetensors")
    info["sd_b"] = load_file(root / "b" / "model.safetensors")
    return info


@pytest.fixture()
def server(models):
    """A fresh server on weights A (each test starts from version 0)."""
    size = len(state_dict_to_safetensors(models["sd_a"]))
    cfg = RolloutConfig(model=str(models["root"] / "a"), port=0, token=TOKEN, max_weights_bytes=size + 4096)
    with running_server(build_app(cfg)) as url, RolloutClient(url, token=TOKEN) as client:
        client.wait_ready(60)
        yield url, client


def outputs(resp) -> list[list[int]]:
    by_prompt = [[s.token_ids for s in resp.samples if s.prompt_index == i] for i in range(len(PROMPTS))]
    assert all(len(rows) == 2 and rows[0] == rows[1] for rows in by_prompt)
    return [rows[0] for rows in by_prompt]


def test_put_weights_serves_exactly_the_new_model(server, models):
    _, client = server
    assert outputs(client.generate(GREEDY)) == models["greedy_a"]
    info = client.put_weights(models["b"].state_dict(), version=1)
    assert info.version == 1
    assert info.sha256 == state_sha256(models["sd_b"], models["sd_b"])
    assert client.weights() == info
    resp = client.generate(GREEDY)
    assert resp.policy_version == 1
    assert outputs(resp) == models["greedy_b"]


def test_load_weights_from_a_path(server, models):
    url, client = server
    info = client.load_weights(str(models["root"] / "b"), version=3)  # a directory of safetensors files
    assert (info.version, info.sha256) == (3, state_sha256(models["sd_b"], models["sd_b"]))
    assert outputs(client.generate(GREEDY)) == models["greedy_b"]
    client.load_weights(str(models["root"] / "a" / "model.safetensors"), version=4)  # a single file
    assert outputs(client.generate(GREEDY)) == models["greedy_a"]
    assert httpx.get(url + "/readyz").json()["version"] == 4


def test_refused_updates_leave_the_old_weights_serving(server, models, tmp_path):
    url, client = server
    before = client.weights()
    client.put_weights(models["sd_a"], version=5)  # same weights, new version: sha unchanged
    served = client.weights()
    assert served.sha256 == before.sha256 and served.version == 5
    body_b = state_dict_to_safetensors(models["sd_b"])

    def refused(call, status: int, reason: str) -> None:
        with pytest.raises(RolloutError) as err:
            call()
        assert err.value.status_code == status, err.value
        assert reason in err.value.detail
        assert client.weights() == served

    with RolloutClient(url, token="wrong") as wrong, RolloutClient(url) as anonymous:
        refused(lambda: wrong.put_weights(body_b, 6), 401, "bearer token")
        refused(lambda: anonymous.put_weights(body_b, 6), 401, "bearer token")
        refused(lambda: wrong.load_weights(str(models["root"] / "b"), 6), 401, "bearer token")
    refused(lambda: client.put_weights(body_b, 5), 409, "not above the served version 5")
    refused(lambda: client.put_weights(body_b, 2), 409, "not above")
    refused(lambda: client.load_weights(str(models["root"] / "b"), 5), 409, "not above")
    missing = {k: v for k, v in models["sd_b"].items() if k != "model.norm.weight"}
    refused(lambda: client.put_weights(missing, 6), 422, "missing 1 tensor(s): model.norm.weight")
    extra = {**models["sd_b"], "model.extra": torch.zeros(2)}
    refused(lambda: client.put_weights(extra, 6), 422, "unexpected 1 tensor(s): model.extra")
    reshaped = {**models["sd_b"], "lm_head.weight": models["sd_b"]["lm_head.weight"][:-1]}
    refused(
        lambda: client.put_weights(reshaped, 6), 422, "lm_head.weight: got [84, 64] float32, want [85, 64]"
    )
    half = {k: v.half() for k, v in models["sd_b"].items()}
    refused(lambda: client.put_weights(half, 6), 422, "float16, want")
    refused(lambda: client.put_weights(b"not safetensors", 6), 422, "unparsable safetensors body")
    pickled = io.BytesIO()
    torch.save(models["sd_b"], pickled)
    refused(lambda: client.put_weights(pickled.getvalue()[:4000], 6), 422, "unparsable")
    refused(lambda: client.put_weights(body_b + b"\0" * 8192, 6), 413, "exceeds max_weights_bytes")
    save_file(missing, str(tmp_path / "partial.safetensors"))
    refused(lambda: client.load_weights(str(tmp_path / "partial.safetensors"), 6), 422, "missing 1 tensor(s)")
    refused(lambda: client.load_weights(str(tmp_path / "nothing-here"), 6), 422, "not a file or directory")
    # a chunked body (no Content-Length) is cut off at the limit too: here a header of 1 MiB (garbage
    # zeros after its length would be refused at once, 422, as an unparsable header)
    chunks = iter([(1 << 20).to_bytes(8, "little"), *(b" " * 4096 for _ in range(200))])
    resp = httpx.put(
        url + "/v1/weights",
        params={"version": 6},
        content=chunks,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert resp.status_code == 413
    assert client.weights() == served
    assert outputs(client.generate(GREEDY)) == models["greedy_a"]
    assert client.put_weights(body_b, 6).version == 6  # and a good update still goes through


def test_weight_updates_need_a_configured_token_unless_insecure(models):
    sd = models["sd_b"]
    for insecure, status in ((False, 403), (True, 200)):
        cfg = RolloutConfig(model=str(models["root"] / "a"), port=0, insecure_no_token=insecure)
        with running_server(build_app(cfg)) as url, RolloutClient(url) as client:
            client.wait_ready(60)
            resp = httpx.put(
                url + "/v1/weights", params={"version": 1}, content=state_dict_to_safetensors(sd)
            )
            assert resp.status_code == status, resp.text
            assert client.weights().version == (1 if insecure else 0)


def test_concurrent_generation_never_sees_a_mix(server, models):
    """Generate from several threads while the weights flip between A and B. Swaps land between decoding
    steps, so a sample may span versions: a sample whose first and last tokens have one version equals that
    version's greedy output entirely; in one that spans versions every token was sampled by A or by B over
    its whole prefix (never by a mix), starting with its first token's version's weights and ending with its
    last's. The response's policy_version is the oldest first-token version."""
    _, client = server
    body = {"a": state_dict_to_safetensors(models["sd_a"]), "b": state_dict_to_safetensors(models["sd_b"])}
    weights_of = {0: "a"}
    seen: list = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        try:
            while not stop.is_set():
                seen.append(client.generate(GREEDY))
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            raise

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 9):
            name = "b" if version % 2 else "a"
            weights_of[version] = name
            client.put_weights(body[name], version)
            while not any(r.samples[-1].first_token_version == version for r in seen) and not errors:
                threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert {s.first_token_version for r in seen for s in r.samples} >= set(range(1, 9))
    candidates = {"a": models["a"], "b": models["b"]}
    for resp in seen:
        assert resp.policy_version == min(s.first_token_version for s in resp.samples)
        for s in resp.samples:
            first, last = s.first_token_version, s.last_token_version
            assert first <= last
            if first == last:
                want = models[f"greedy_{weights_of[first]}"][s.prompt_index]
                assert s.token_ids == want, f"version {first} served a mix"
                continue
            changes = runs(sampled_by(s, PROMPTS[s.prompt_index], candidates))
            assert changes[0] == weights_of[first] and changes[-1] == weights_of[last], (first, last, changes)
            assert len(changes) - 1 <= last - first, (first, last, changes)


class SlowGate(WeightsGate):
    """Decoding slowed by `delay_s` per forward, slept outside the gate (an install does not wait for it)."""

    def __init__(self, version: int, delay_s: float) -> None:
        super().__init__(version)
        self.delay_s, self.started = delay_s, threading.Event()

    def step(self):
        self.started.set()
        time.sleep(self.delay_s)
        return super().step()


def test_a_push_lands_mid_generation_without_waiting_for_it(models):
    """A long generation (500 new tokens, slowed to ~2.5 s) is in flight when new weights are pushed: the
    push returns long before the generation ends; the generation continues under the new weights from its
    next decoding step; its samples start at version 0 and end at version 1, each token's behaviour logprob
    is the log-softmax of the weights that sampled it (A, then B, over the whole prefix); the response's
    policy_version is the oldest, 0."""
    cfg = RolloutConfig(model=str(models["root"] / "a"), port=0, token=TOKEN)
    engine = HFEngine.load(cfg)
    engine._gate = gate = SlowGate(engine.version, delay_s=0.005)
    body = state_dict_to_safetensors(models["sd_b"])
    request = GenerateRequest(
        prompts=[PROMPTS[0]], n=2, max_new_tokens=500, top_p=0.9, seed=3, stop_token_ids=[]
    )
    result: dict = {}
    with running_server(build_app(cfg, engine=engine)) as url, RolloutClient(url, token=TOKEN) as client:

        def generate() -> None:
            result["response"] = client.generate(request)
            result["done"] = time.monotonic()

        thread = threading.Thread(target=generate)
        thread.start()
        assert gate.started.wait(30)
        time.sleep(0.3)
        start = time.monotonic()
        info = client.put_weights(body, version=1)
        pushed = time.monotonic()
        thread.join(120)
        assert client.generate(GREEDY).policy_version == 1
    asyncio.run(engine.close())
    assert info.version == 1
    assert pushed - start < 1.0 and pushed < result["done"] - 1.0, (pushed - start, result["done"] - pushed)
    resp = result["response"]
    assert resp.policy_version == 0
    for s in resp.samples:
        assert (s.first_token_version, s.last_token_version) == (0, 1)
        assert len(s.token_ids) == 500
        labels = sampled_by(s, PROMPTS[0], {"a": models["a"], "b": models["b"]})
        assert runs(labels) == ["a", "b"]
        assert 20 < labels.index("b") < 450  # the swap landed mid-way


def test_a_failed_install_stops_serving_instead_of_serving_a_mix(models, monkeypatch):
    cfg = RolloutConfig(model=str(models["root"] / "a"), port=0, token=TOKEN)
    engine = HFEngine.load(cfg)

    def broken(staged) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_install_sync", broken)
    with (
        running_server(build_app(cfg, engine=engine)) as url,
        RolloutClient(url, token=TOKEN, retries=0) as client,
    ):
        assert client.ready()
        with pytest.raises(RolloutError) as err:
            client.put_weights(models["sd_b"], 1)
        assert err.value.status_code == 503 and "device lost" in err.value.detail
        assert not client.ready()
        assert httpx.get(url + "/healthz").status_code == 503
        with pytest.raises(RolloutError) as err:
            client.generate(GREEDY)
        assert err.value.status_code == 503
        with pytest.raises(RolloutError) as err:
            client.weights()
        assert err.value.status_code == 503
    asyncio.run(engine.close())
