"""Oversized HTTP bodies against the real `opd rollout serve` process: a 100+ MB declared body and 150 MB
streamed (chunked) bodies are refused with 413 and a reason, without the server buffering them (its RSS
grows by far less than the body), and the server answers normally afterwards. (A streamed weight body
whose safetensors header itself declares too much is refused before its data: tests/integration/
test_weights_stream.py.)"""

from __future__ import annotations

import select
import socket
from pathlib import Path

import httpx
import pytest

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.redis_server import free_port
from services.rollout.client import RolloutClient
from tests.integration.fault_procs import Proc, wait_until

pytestmark = pytest.mark.integration
TOKEN = "oversize-" + "k" * 24
LIMIT = 1 << 20  # both limits of the server under test
BIG = 150 << 20
MiB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_llama(
        tmp_path_factory.mktemp("big") / "m", seed=0, tokenizer=build_char_tokenizer("abc")
    )
    port = free_port()
    args = ["rollout", "serve", "--model", str(model), "--port", str(port), "--max-model-len", "64"]
    args += ["--max-weights-bytes", str(LIMIT), "--max-request-bytes", str(LIMIT), "--log-level", "warning"]
    proc = Proc(args, model.parent / "rollout.log", {"OPD_WEIGHTS_TOKEN": TOKEN}).start()
    try:
        with RolloutClient(f"http://127.0.0.1:{port}") as client:
            wait_until(client.ready, 120, "rollout", [proc], interval=0.2)
        yield proc.proc, port
    finally:
        proc.terminate(30)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response (the server sends Content-Length)."""
    data = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"connection closed before a response: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"
    )
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, "connection closed mid-body"
        body += piece
    return int(lines[0].split(" ", 2)[1]), body


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def stream_until_answered(port: int, method: str, path: str, total: int) -> tuple[int, bytes, int]:
    """Send a chunked body of up to `total` bytes, stopping as soon as the server answers.
    Returns (status, body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    headers = {"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"}
    headers["Content-Type"] = "application/json" if method == "POST" else "application/octet-stream"
    sock.sendall(request_head(method, path, headers))
    if method == "PUT":  # a safetensors body announcing a 64 MiB header: the server reads it (to the limit)
        sock.sendall(b"8\r\n" + (64 * MiB).to_bytes(8, "little") + b"\r\n")
    piece = b"[" + b"1," * (MiB // 2 - 1) + b"1"  # ~1 MiB of a JSON array that never closes
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent = 0
    sock.setblocking(False)
    try:
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break  # the server answered before the body ended
            if writable:
                try:
                    sent += sock.send(chunk[sent % len(chunk) :] if sent % len(chunk) else chunk)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
        sock.setblocking(True)
        status, body = read_response(sock)
    finally:
        sock.close()
    return status, body, sent


def test_declared_oversized_body_is_refused_before_it_is_read(server):
    proc, port = server
    before = rss_bytes(proc.pid)
    for method, path, name in (
        ("PUT", "/v1/weights?version=1", "max_weights_bytes"),
        ("POST", "/v1/generate", "max_request_bytes"),
    ):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            headers = {
                "Authorization": f"Bearer {TOKEN}",
                "Content-Length": str(BIG),
                "Content-Type": "application/json",
            }
            sock.sendall(request_head(method, path, headers) + b"x" * 4096)  # then the client would go on
            status, body = read_response(sock)
        assert status == 413, body
        assert f"body of {BIG} bytes exceeds {name} {LIMIT}".encode() in body
    grown = rss_bytes(proc.pid) - before
    print(f"declared {BIG / MiB:.0f} MiB bodies: server RSS grew {grown / MiB:.1f} MiB")
    assert grown < 20 * MiB


@pytest.mark.parametrize(
    "method,path,name",
    [("PUT", "/v1/weights?version=1", "max_weights_bytes"), ("POST", "/v1/generate", "max_request_bytes")],
)
def test_streamed_oversized_body_is_cut_off_at_the_limit(server, method, path, name):
    proc, port = server
    before = rss_bytes(proc.pid)
    status, body, sent = stream_until_answered(port, method, path, BIG)
    assert status == 413, body
    assert f"body exceeds {name} {LIMIT}".encode() in body
    assert LIMIT < sent < BIG  # refused while the client was still sending, after the limit
    grown = rss_bytes(proc.pid) - before
    print(f"{method} {path}: sent {sent / MiB:.1f} MiB before the 413; server RSS grew {grown / MiB:.1f} MiB")
    assert grown < 30 * MiB, "the server buffered the body"
    # and it serves normally afterwards
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/generate", json={"prompts": [[1, 2, 3]], "max_new_tokens": 2}, timeout=60
    )
    assert r.status_code == 200
