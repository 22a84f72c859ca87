"""The rollout service over HTTPS with certificates made in the test: every client (sync, async, the trainer's
weight push) verifies the server against a CA bundle, and refuses a server its CA did not sign."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from safetensors.torch import load_file

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.common.redis_keys import connect, policy_version_key
from services.common.redis_server import EmbeddedRedis
from services.rollout.app import build_app
from services.rollout.client import AsyncRolloutClient, RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.protocol import GenerateRequest
from services.rollout.server import running_server
from trainer.weight_sync import StateDictWeights, WeightSync

pytestmark = pytest.mark.integration

TOKEN = "tls-" + "t" * 28
REQUEST = GenerateRequest(prompts=[[5, 6, 7]], n=2, max_new_tokens=4, seed=1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(
        tmp_path_factory.mktemp("tls") / "m", seed=0, tokenizer=build_char_tokenizer("abc")
    )


@pytest.fixture(scope="module")
def https_url(model_path, tls_files):
    cfg = RolloutConfig(
        model=str(model_path),
        port=0,
        token=TOKEN,
        max_model_len=64,
        tls_cert_file=tls_files.cert_file,
        tls_key_file=tls_files.key_file,
    )
    with running_server(build_app(cfg)) as url:
        assert url.startswith("https://")
        with RolloutClient(url, tls_ca_file=tls_files.ca_file) as client:
            client.wait_ready(60)
        yield url


def test_clients_speak_https_with_a_ca_bundle(https_url, tls_files, model_path):
    with RolloutClient(https_url, token=TOKEN, tls_ca_file=tls_files.ca_file) as client:
        assert len(client.generate(REQUEST).samples) == 2
        before = client.weights()
        info = client.put_weights(load_file(model_path / "model.safetensors"), before.version + 1)
        assert info.version == before.version + 1 and info.sha256 == before.sha256

    async def async_calls():
        async with AsyncRolloutClient(https_url, tls_ca_file=tls_files.ca_file) as client:
            return await client.ready(), await client.generate(REQUEST)

    ready, response = asyncio.run(async_calls())
    assert ready and len(response.samples) == 2


def test_trainer_weight_push_over_https(https_url, tls_files, model_path):

    model = load_causal_lm(model_path)
    with EmbeddedRedis() as redis_server:
        client = connect(redis_server.url)
        sync = WeightSync(client, "tls", [https_url], token=TOKEN, tls_ca_file=tls_files.ca_file)
        try:
            version = max(sync.versions()) + 1
            sync.push(StateDictWeights(model.state_dict()), version)
            assert sync.versions() == [version]
            assert int(client.get(policy_version_key("tls"))) == version
        finally:
            sync.close()


def test_a_server_outside_the_trusted_ca_is_refused(https_url, tls_files):
    for ca in (tls_files.other_ca_file, None):  # an unrelated CA, the system CAs
        with RolloutClient(https_url, tls_ca_file=ca, retries=0) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                client.weights()
            assert not client.ready()
    # plaintext HTTP to the TLS port gets no answer
    with RolloutClient(https_url.replace("https://", "http://"), retries=0, timeout_s=5) as client:
        with pytest.raises(httpx.TransportError):
            client.weights()


def test_tls_config_needs_both_files(model_path, tls_files, tmp_path):
    from services.common.config import ConfigError

    with pytest.raises(ConfigError, match="give both or neither"):
        RolloutConfig(model=str(model_path), tls_cert_file=tls_files.cert_file)
    with pytest.raises(ConfigError, match="is not a file"):
        RolloutConfig(
            model=str(model_path), tls_cert_file=str(tmp_path / "no"), tls_key_file=tls_files.key_file
        )
