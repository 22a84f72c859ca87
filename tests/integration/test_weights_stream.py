"""Streamed weight pushes against real rollout servers (hf backend) on loopback, no mocks: one pass over the
trainer's tensors fanned out to two servers lands bit-exact (sha256); a header that does not fit the model,
a stale version and an oversized declaration are refused before the body is read (the server answers at
once and closes); truncated, overlong and abandoned bodies are refused with the served weights untouched;
wrong tokens; a sender whose tensors disagree with its specs aborts without installing anything."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load_file

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.redis_server import EmbeddedRedis
from services.rollout.app import build_app
from services.rollout.client import (
    PushAborted,
    RolloutClient,
    RolloutError,
    push_weights_stream,
    state_dict_to_safetensors,
)
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.server import running_server
from services.rollout.weights_stream import encode_header
from trainer.weight_sync import WeightSync

pytestmark = pytest.mark.integration

TOKEN = "stream-" + "s" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 48 << 20


class CountingWeights:
    """trainer.weight_sync.Weights over a state dict that counts its passes (one pass only, as under FSDP)."""

    replayable = False

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd, self.passes, self.yielded = sd, 0, 0

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(name, tuple(t.shape), t.dtype) for name, t in self.sd.items()]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.passes += 1
        for name, t in self.sd.items():
            self.yielded += 1
            yield name, t.clone()  # a fresh tensor per name, as a gather makes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("stream") / "m", seed=0, tokenizer=build_char_tokenizer())
    sd = load_file(path / "model.safetensors")
    return dict(path=path, sd=sd, size=len(state_dict_to_safetensors(sd)))


@pytest.fixture
def servers(model):
    """Two fresh servers on the model's weights (version 0), max_weights_bytes LIMIT."""
    cfg = RolloutConfig(model=str(model["path"]), port=0, token=TOKEN, max_weights_bytes=LIMIT)
    with running_server(build_app(cfg)) as url_a, running_server(build_app(cfg)) as url_b:
        clients = [RolloutClient(url, token=TOKEN) for url in (url_a, url_b)]
        for c in clients:
            c.wait_ready(60)
        yield [url_a, url_b], clients
        for c in clients:
            c.close()


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def shifted(sd: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {name: t + by for name, t in sd.items()}


def sha(sd: dict[str, torch.Tensor]) -> str:
    return state_sha256(sd, sd)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_put(url: str, version: int, headers: dict[str, str], body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(url)))
    lines = [f"PUT /v1/weights?version={version} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in {**AUTH, **headers}.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one response; then the server must close the connection."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before a response: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (h.partition(": ") for h in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_one_pass_fanned_out_to_two_servers_lands_bit_exact(model, servers, redis_url):
    urls, clients = servers
    new = shifted(model["sd"], 0.25)
    weights = CountingWeights(new)
    r = redis_keys.connect(redis_url)
    # tiny buckets and queues: many buckets, each server holding back the pass in turn
    sync = WeightSync(r, "stream", urls, token=TOKEN, bucket_bytes=8192, queue_buckets=1)
    try:
        seconds = sync.push(weights, 1)
    finally:
        sync.close()
    assert seconds > 0
    assert (weights.passes, weights.yielded) == (1, len(new))  # one pass over tensors() for both servers
    for c in clients:
        info = c.weights()
        assert (info.version, info.sha256) == (1, sha(new)) != (0, sha(model["sd"]))
    assert int(r.get(redis_keys.policy_version_key("stream"))) == 1


def test_the_response_can_come_before_the_hash(model, servers):
    _, (client, _) = servers
    new = shifted(model["sd"], -0.5)
    specs = [(n, tuple(t.shape), t.dtype) for n, t in new.items()]
    (info,) = push_weights_stream([client], specs, iter(new.items()), 1, wait_sha256=False)
    assert not isinstance(info, Exception), info
    assert (info.version, info.sha256) == (1, "")  # answered right after the swap
    assert client.weights().sha256 == sha(new)  # GET waits for the hash computed after it
    assert client.put_weights(model["sd"], 2).sha256 == sha(model["sd"])  # by default the response has it


def test_a_header_that_does_not_fit_is_refused_before_the_body(model, servers):
    urls, (client, _) = servers
    before = client.weights()
    wrong = {**model["sd"], "lm_head.weight": torch.zeros(3, 3)}
    wrong.pop("model.norm.weight")
    prefix, length = encode_header([(n, tuple(t.shape), t.dtype) for n, t in wrong.items()])
    # the header only, of a body declared whole: the server must answer without waiting for the data
    sock = raw_put(urls[0], 1, {"Content-Length": str(length)}, prefix)
    try:
        status, headers, body = read_response(sock)
        assert status == 422 and headers.get("connection") == "close"
        assert "missing 1 tensor(s): model.norm.weight" in body["detail"]
        assert "lm_head.weight: got [3, 3] float32" in body["detail"]
        assert closed_by_server(sock)
    finally:
        sock.close()
    # through the client with a large body: the refusal reaches the sender, whose pass still ends
    big = {**model["sd"], "extra.weight": torch.zeros(8 << 20)}  # 32 MiB the server never reads
    weights = CountingWeights(big)
    (result,) = push_weights_stream([client], weights.specs(), weights.tensors(), 1)
    assert isinstance(result, RolloutError) and result.status_code == 422
    assert "unexpected 1 tensor(s): extra.weight" in result.detail
    assert weights.yielded == len(big)
    assert client.weights() == before


def test_stale_versions_and_oversized_declarations_are_refused_before_the_body(model, servers):
    urls, (client, _) = servers
    client.put_weights(model["sd"], 3)
    before = client.weights()
    sock = raw_put(urls[0], 3, {"Content-Length": str(model["size"])}, b"")  # no body sent at all
    try:
        status, headers, body = read_response(sock)
        assert (status, headers.get("connection")) == (409, "close")
        assert "not above the served version 3" in body["detail"]
    finally:
        sock.close()
    # a chunked body whose header declares more than max_weights_bytes: 413 before its data
    prefix, length = encode_header([("w", (LIMIT // 4,), torch.float32)])
    resp = httpx.put(urls[0] + "/v1/weights", params={"version": 4}, content=iter([prefix]), headers=AUTH)
    assert resp.status_code == 413 and "per its safetensors header" in resp.json()["detail"]
    # a declared Content-Length over the limit: BodyLimit's 413 before anything is read
    sock = raw_put(urls[0], 4, {"Content-Length": str(length)}, b"")
    try:
        status, _, body = read_response(sock)
        assert status == 413 and "exceeds max_weights_bytes" in body["detail"]
    finally:
        sock.close()
    assert client.weights() == before


def test_truncated_overlong_and_abandoned_bodies_leave_the_weights_untouched(model, servers):
    urls, (client, _) = servers
    before = client.weights()
    body = state_dict_to_safetensors(shifted(model["sd"], 1.0))

    def chunked(data: bytes) -> httpx.Response:  # no Content-Length: the body's end is the chunked end
        pieces = iter([data[i : i + 4096] for i in range(0, len(data), 4096)])
        return httpx.put(urls[0] + "/v1/weights", params={"version": 1}, content=pieces, headers=AUTH)

    resp = chunked(body[: len(body) // 2])
    assert resp.status_code == 422 and "truncated safetensors body" in resp.json()["detail"]
    resp = chunked(body + b"\0" * 16)
    assert resp.status_code == 422 and "body longer than its safetensors header" in resp.json()["detail"]
    resp = chunked(body[:100])
    assert resp.status_code == 422 and "ends inside the header" in resp.json()["detail"]
    # a sender that dies half-way (Content-Length declared, connection dropped)
    sock = raw_put(urls[0], 1, {"Content-Length": str(len(body))}, body[: len(body) // 2])
    sock.close()
    assert client.weights() == before
    # Content-Length that disagrees with the header
    resp = httpx.put(urls[0] + "/v1/weights", params={"version": 1}, content=body + b"\0", headers=AUTH)
    assert resp.status_code == 422 and "differs from the" in resp.json()["detail"]
    assert client.weights() == before
    assert client.put_weights(body, 1).version == 1  # and the server takes a good one afterwards


def test_refusals_through_the_trainer_push(model, servers, redis_url):
    urls, (client, other) = servers
    r = redis_keys.connect(redis_url)
    wrong = WeightSync(r, "refusals", urls, token="wrong-token")
    weights = CountingWeights(shifted(model["sd"], 2.0))
    with pytest.raises(RolloutError) as err:
        wrong.push(weights, 1)
    wrong.close()
    assert err.value.status_code == 401 and weights.passes == 1
    other.put_weights(model["sd"], 5)
    sync = WeightSync(r, "refusals", urls, token=TOKEN)
    try:
        with pytest.raises(RolloutError) as err:
            sync.push(CountingWeights(shifted(model["sd"], 2.0)), 4)  # server 1 is at 5: stale there
        assert err.value.status_code == 409 and "not above the served version 5" in err.value.detail
        assert client.weights().version == 4  # the other server took it
        # a Weights whose tensors disagree with its specs: the push aborts, nothing is installed
        bad = CountingWeights(shifted(model["sd"], 3.0))
        bad.sd = {**bad.sd}
        name = next(iter(bad.sd))
        specs = bad.specs()
        bad.specs = lambda: specs  # type: ignore[method-assign]
        bad.sd[name] = bad.sd[name][:1]
        before = [c.weights() for c in (client, other)]
        with pytest.raises(ValueError, match="where specs\\(\\) promised"):
            sync.push(bad, 6)
        assert [c.weights() for c in (client, other)] == before
        assert (bad.passes, bad.yielded) == (1, len(bad.sd))  # the pass still went to its end (FSDP)
    finally:
        sync.close()
    # a server that stays down: the push fails after down_timeout_s, having still read the whole pass
    dead = WeightSync(r, "refusals", ["http://127.0.0.1:9"], token=TOKEN, down_timeout_s=0.5)
    weights = CountingWeights(model["sd"])
    for c in dead.clients:
        c.retries = 0
    with pytest.raises(httpx.TransportError):
        dead.push(weights, 1)
    dead.close()
    assert (weights.passes, weights.yielded) == (1, len(model["sd"]))


def test_an_aborted_pass_cuts_every_request_off(model, servers):
    _, clients = servers
    before = [c.weights() for c in clients]
    specs = [(n, tuple(t.shape), t.dtype) for n, t in model["sd"].items()]

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        items = list(model["sd"].items())
        yield from items[: len(items) // 2]
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        push_weights_stream(clients, specs, failing(), 1, bucket_bytes=4096)
    assert [c.weights() for c in clients] == before
    assert PushAborted.__doc__  # the exception the servers' requests were cut off with
