"""Property-based API fuzzing: schemathesis generates requests from /openapi.json; no response is a 5xx."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from services.common.tiny_models import build_char_tokenizer, make_tiny_llama
from services.rollout.app import build_app
from services.rollout.client import RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.server import running_server

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = make_tiny_llama(
        tmp_path_factory.mktemp("fuzz") / "m", seed=0, tokenizer=build_char_tokenizer("abc")
    )
    # small limits keep generated requests cheap: fuzzing is about status codes, not throughput
    cfg = RolloutConfig(model=str(path), port=0, token=TOKEN, max_model_len=64, max_weights_bytes=1 << 20)
    with running_server(build_app(cfg)) as base, RolloutClient(base) as client:
        client.wait_ready(60)
        yield base


@pytest.mark.parametrize("authorized", [True, False])
def test_no_operation_answers_5xx(url, authorized):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/generate", "PUT /v1/weights", "POST /v1/weights/load", "GET /v1/weights"} <= labels
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
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text)

        check()
    assert 200 in statuses["POST /v1/generate"]  # the schema's examples run first: the happy path is covered
