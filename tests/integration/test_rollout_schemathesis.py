"""Property-based API fuzzing of the rollout service: schemathesis generates requests from /openapi.json for
every operation, with and without the weight token, and hypothesis sends garbage safetensors bodies with a
valid token and version (so that body validation, not only the 401 path, is exercised). No response is a
5xx, and every rejected update leaves the served weights as they were: the version, the hash of the live
model's tensors and a fixed-seed generation (ids and logprobs) are identical before and after."""

from __future__ import annotations

import json
import struct
from collections import Counter

import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, state_dict_to_safetensors
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.server import running_server

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROBE = {"prompts": [[1, 2, 3, 4]], "n": 2, "max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 11}
WEIGHT_OPS = {"PUT /v1/weights", "POST /v1/weights/load"}
tally: Counter[str] = Counter()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    path = make_tiny_llama(root / "m", seed=0, tokenizer=build_char_tokenizer("abc"))
    weights_dir = root / "weights"  # empty: no load request can name a checkpoint that installs
    weights_dir.mkdir()
    # small limits keep generated requests cheap: fuzzing is about status codes, not throughput
    cfg = RolloutConfig(
        model=str(path),
        port=0,
        token=TOKEN,
        max_model_len=64,
        max_weights_bytes=1 << 20,
        weights_dir=str(weights_dir),
    )
    app = build_app(cfg)
    with running_server(app) as base, RolloutClient(base) as client:
        client.wait_ready(60)
        state = served_state(base, app)
        yield base, app, path, state
        # every test of the module rejected every update: the served weights are those of the start
        assert served_state(base, app) == state
    print("rollout fuzz tally:", dict(sorted(tally.items())))


def served_state(url: str, app) -> tuple:
    """(version, reported sha256, sha256 of the live model's tensors, a fixed-seed generation)."""
    info = httpx.get(url + "/v1/weights").json()
    sd = app.state.engine.model.state_dict()
    generation = httpx.post(url + "/v1/generate", json=PROBE, timeout=60).json()
    return info["version"], info["sha256"], state_sha256(sd, sd.keys()), json.dumps(generation)


def version_of(url: str) -> int:
    return httpx.get(url + "/v1/weights").json()["version"]


@pytest.mark.parametrize("authorized", [True, False])
def test_no_operation_answers_5xx(service, authorized):
    url, app, _, state = service
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    headers = AUTH if authorized else {}
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {
        "POST /v1/generate",
        "GET /v1/weights",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    } | WEIGHT_OPS <= labels
    statuses: dict[str, set[int]] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def check(case) -> None:
            if case.path == "/v1/generate" and isinstance(case.body, dict):
                # bound the work a generated request may ask for (the schema allows 65536 new tokens
                # and 256 samples): the service would serve them, only slowly
                for key, cap in (("max_new_tokens", 8), ("n", 4)):
                    value = case.body.get(key)
                    if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                        case.body[key] = cap
            response = case.call(base_url=url, headers=headers, timeout=30)
            label = f"{case.method} {case.path}"
            statuses.setdefault(label, set()).add(response.status_code)
            tally[f"schemathesis {'auth' if authorized else 'noauth'} {response.status_code}"] += 1
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text)
            if label in WEIGHT_OPS:
                assert response.status_code >= 400, (case.as_curl_command(), response.text)
                assert version_of(url) == state[0]

        check()
    assert 200 in statuses["POST /v1/generate"]  # the schema's examples run first: the happy path is covered
    if authorized:  # with the token, garbage reaches body validation (422), not only the token check
        assert 422 in statuses["PUT /v1/weights"] and 422 in statuses["POST /v1/weights/load"], statuses
    else:
        assert statuses["PUT /v1/weights"] == {401} and statuses["POST /v1/weights/load"] <= {401, 422}


@st.composite
def garbage_bodies(draw, valid: bytes, header_end: int, wrong_tensors: st.SearchStrategy[bytes]) -> bytes:
    """Bodies that are not the served model's full state dict: random bytes, a valid body cut short, a
    header byte changed, a lying header length, or a well-formed file of the wrong tensors."""
    kind = draw(st.sampled_from(["random", "truncated", "header_byte", "header_length", "wrong_tensors"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "header_byte":
        # within the JSON header only: a changed data byte would be a valid update of other weights
        at = draw(st.integers(8, header_end - 1))
        byte = draw(st.integers(0, 255).filter(lambda b: b != valid[at] and chr(b) not in " \t\r\n"))
        return valid[:at] + bytes([byte]) + valid[at + 1 :]
    if kind == "header_length":
        n = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1, len(valid)])))
        return struct.pack("<Q", n) + valid[8:]
    return draw(wrong_tensors)


def test_garbage_weight_bodies_with_a_valid_token_are_refused(service):
    url, app, path, state = service
    sd = load_file(path / "model.safetensors")
    valid = state_dict_to_safetensors(sd)
    header_end = 8 + struct.unpack("<Q", valid[:8])[0]
    names = sorted(sd)

    def mutate(choice: tuple[str, int]) -> bytes:
        how, i = choice
        name = names[i % len(names)]
        bad = dict(sd)
        if how == "missing":
            del bad[name]
        elif how == "extra":
            bad["extra.weight"] = torch.zeros(2)
        elif how == "shape":
            bad[name] = torch.zeros(*sd[name].shape[:-1], sd[name].shape[-1] + 1)
        else:  # dtype
            bad[name] = sd[name].to(torch.float16)
        return state_dict_to_safetensors(bad)

    wrong_tensors = st.tuples(
        st.sampled_from(["missing", "extra", "shape", "dtype"]), st.integers(0, 999)
    ).map(mutate)

    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:

        @given(body=garbage_bodies(valid, header_end, wrong_tensors))
        @settings(
            max_examples=120,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(body: bytes) -> None:
            r = http.put("/v1/weights", params={"version": state[0] + 1}, content=body)
            tally[f"garbage body {r.status_code}"] += 1
            assert r.status_code in (413, 422), (r.status_code, r.text, body[:80])
            assert r.json()["detail"]  # a reason
            assert version_of(url) == state[0]

        check()
    assert sum(v for k, v in tally.items() if k.startswith("garbage body")) >= 120
    assert served_state(url, app) == state
