"""Rollout service, hf backend, over real HTTP: versioned weight updates, atomic swaps, refused updates."""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama, save_model
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, RolloutError, state_dict_to_safetensors
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.protocol import GenerateRequest
from services.rollout.server import running_server

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [20, 21, 22, 23, 24, 25, 26]]
STEPS = 16
GREEDY = GenerateRequest(prompts=PROMPTS, n=2, max_new_tokens=STEPS, top_p=1e-6, stop_token_ids=[])


def make_peaked_llama(path, seed: int, tokenizer):
    """A tiny Llama with a scaled-up output layer, so greedy outputs have clear argmax margins."""
    make_tiny_llama(path, seed=seed, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    tok = build_char_tokenizer()
    a, b = make_peaked_llama(root / "a", 0, tok), make_peaked_llama(root / "b", 1, tok)
    # "fresh model loaded with the new weights": B as read back from its own checkpoint directory
    fresh_b = AutoModelForCausalLM.from_pretrained(root / "b").eval()
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
    # a chunked body (no Content-Length) is cut off at the limit too
    chunks = (b"\0" * 4096 for _ in range(200))
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
    """Generate from several threads while the weights flip between A and B: each response must equal A's
    or B's greedy output entirely, and the one its policy_version names."""
    _, client = server
    body = {"a": state_dict_to_safetensors(models["sd_a"]), "b": state_dict_to_safetensors(models["sd_b"])}
    weights_of = {0: "a"}
    seen: list[tuple[int, list[list[int]]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        try:
            while not stop.is_set():
                resp = client.generate(GREEDY)
                seen.append((resp.policy_version, outputs(resp)))
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
            while sum(1 for v, _ in seen if v == version) < 1 and not errors:  # let requests run on it
                threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert {v for v, _ in seen} >= set(range(1, 9))
    for version, out in seen:
        assert out == models[f"greedy_{weights_of[version]}"], f"version {version} served a mix"


def test_a_failed_install_stops_serving_instead_of_serving_a_mix(models, monkeypatch):
    from services.rollout.hf_engine import HFEngine

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
