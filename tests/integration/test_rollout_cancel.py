"""A client that goes away stops its generation: the rollout server watches for the disconnect and cancels,
and the hf engine's decoding thread stops at its next step, so a retried request never doubles the work."""

from __future__ import annotations

import time

import httpx
import pytest

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.rollout.app import build_app
from services.rollout.config import RolloutConfig
from services.rollout.server import running_server
from tests.integration.fault_procs import metric

pytestmark = pytest.mark.integration


def test_an_abandoned_generation_stops_consuming_the_engine(tmp_path):
    tok = build_char_tokenizer()
    model = make_tiny_llama(tmp_path / "m", seed=0, tokenizer=tok, max_positions=8192)
    cfg = RolloutConfig(model=str(model), backend="hf", device="cpu", port=0, insecure_no_token=True)
    long = {"texts": ["1+1="], "n": 8, "max_new_tokens": 6000, "stop_token_ids": [], "seed": 0}
    short = {"texts": ["1+1="], "n": 1, "max_new_tokens": 4, "seed": 0}
    with running_server(build_app(cfg)) as url:
        httpx.post(f"{url}/v1/generate", json=short, timeout=120).raise_for_status()  # warm
        # 8 rows x 6,000 tokens: tens of seconds of decoding on this CPU; the client gives up after 1 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json=long, timeout=1.0)
        # The hf engine decodes one request at a time: had the abandoned one kept running, this would wait
        # for all of it.
        t0 = time.monotonic()
        httpx.post(f"{url}/v1/generate", json=short, timeout=120).raise_for_status()
        assert time.monotonic() - t0 < 5.0
        deadline = time.monotonic() + 10
        while metric(url, "opd_rollout_abandoned_requests_total") < 1:
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.1)
        assert metric(url, "opd_rollout_requests_total", 'code="499",route="/v1/generate"') == 1
