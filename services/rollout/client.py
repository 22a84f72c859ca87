"""Clients of the rollout HTTP API (DESIGN.md 3.2), used by the rollout worker and the trainer.

Retries: reads (`generate`, `weights`) retry connection errors and 503 (loading, overloaded) with
exponential backoff. Weight updates retry only when nothing reached the server (connect errors) or the
server said 503 before doing anything, so a retried update can never install twice (and the version
check would refuse a second install anyway). Other HTTP errors raise `RolloutError` with the server's
reason.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from services.rollout.protocol import GenerateRequest, GenerateResponse, LoadWeightsRequest, WeightInfo
from services.rollout.weights_stream import (
    BUCKET_BYTES,
    PIECE_BYTES,
    ST_DTYPES,
    NamedSpec,
    encode_header,
    iter_body,
)


class RolloutError(Exception):
    """The rollout service answered with an error status; `detail` is its reason."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"rollout service: HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class SafetensorsStream:
    """The safetensors encoding of a state dict, produced in pieces of at most `piece` bytes.

    Streaming (instead of `safetensors.torch.save`) sends the first bytes at once, never holds a second
    copy of the weights, and moves device tensors to the CPU one at a time. Small pieces also matter for
    httpx: its sync socket write re-slices the whole remaining buffer after every send(), quadratic in the
    body size (~1 s for 100 MB in one piece). Tied aliases (same storage, shape and dtype, e.g. lm_head =
    embeddings) are written once; the server treats them as optional. Iterable again (client retries).
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], piece: int = 1 << 20) -> None:
        self.piece = piece
        self.tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]] = set()
        for name, tensor in state_dict.items():
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            if tensor.dtype not in ST_DTYPES:
                raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors encoding here")
            self.tensors[name] = tensor.detach()
        # larger elements first (as safetensors itself does): every tensor's offset stays aligned
        self.order = sorted(self.tensors, key=lambda n: (-self.tensors[n].element_size(), n))
        header, offset = {}, 0
        for name in self.order:
            t = self.tensors[name]
            size = t.numel() * t.element_size()
            header[name] = {
                "dtype": ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # the data buffer starts 8-byte aligned
        self.prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
        self.length = len(self.prefix) + offset

    def __iter__(self) -> Iterator[bytes]:
        yield self.prefix
        for name in self.order:
            t = self.tensors[name].to("cpu").contiguous()
            if t.numel() == 0:
                continue
            data = t.reshape(-1).view(torch.uint8).numpy().data  # raw little-endian bytes, any dtype
            for start in range(0, len(data), self.piece):
                yield bytes(data[start : start + self.piece])


class _Pieces:
    """A body already in memory, as 1 MiB pieces (see SafetensorsStream on httpx and large writes)."""

    def __init__(self, body: bytes, piece: int = 1 << 20) -> None:
        self.body, self.piece, self.length = body, piece, len(body)

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.body)
        for start in range(0, len(view), self.piece):
            yield bytes(view[start : start + self.piece])


def state_dict_to_safetensors(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict (for callers that send one body to several servers)."""
    return b"".join(SafetensorsStream(state_dict))


def tls_verify(ca_file: str | None) -> ssl.SSLContext | bool:
    """httpx `verify` for https:// URLs: the CA bundle `ca_file` (e.g. a private CA), else the system's."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def _backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 2**attempt) * (0.5 + random.random())


def _check(resp: httpx.Response) -> httpx.Response:
    if resp.is_success:
        return resp
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        detail = resp.text
    raise RolloutError(resp.status_code, detail if isinstance(detail, str) else str(detail))


class RolloutClient:
    """Blocking client; thread-safe (one connection pool), usable as a context manager. `https://` URLs are
    verified against `tls_ca_file` when given, else the system CAs."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 3,
        tls_ca_file: str | None = None,
    ):
        self.retries = retries
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, verify=tls_verify(tls_ca_file)
        )

    def _request(
        self, method: str, path: str, *, idempotent: bool, retry_503: bool = True, **kw
    ) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.ConnectError:
                if last:
                    raise
            except httpx.TransportError:
                if last or not idempotent:
                    raise
            else:
                if resp.status_code != 503 or last or not retry_503:
                    return _check(resp)
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def generate(self, req: GenerateRequest) -> GenerateResponse:
        body = req.model_dump(exclude_none=True)
        resp = self._request("POST", "/v1/generate", idempotent=True, json=body)
        return GenerateResponse.model_validate_json(resp.content)

    def weights(self) -> WeightInfo:
        return WeightInfo.model_validate_json(self._request("GET", "/v1/weights", idempotent=True).content)

    def put_weights(
        self, state_dict: Mapping[str, torch.Tensor] | bytes, version: int, *, wait_sha256: bool = True
    ) -> WeightInfo:
        """Push the full state dict (or its safetensors bytes) as `version`. `wait_sha256=False`: the server
        answers right after the swap, with sha256 "" (`weights()` returns it once computed)."""
        body = _Pieces(state_dict) if isinstance(state_dict, bytes) else SafetensorsStream(state_dict)
        return self.put_weights_stream(body, body.length, version, wait_sha256=wait_sha256)

    def put_weights_stream(
        self, body: Iterable[bytes | memoryview], length: int, version: int, *, wait_sha256: bool = True
    ) -> WeightInfo:
        """Push a safetensors body given as pieces (each at most ~1 MiB: httpx's sync writer re-slices a
        large piece after every partial send) of `length` bytes in all. A one-pass iterator is fine: the
        request is retried only on connect errors, before any piece is taken (and on 503 when `body` can be
        iterated again, i.e. is not itself an iterator)."""
        headers = {**self._auth, "Content-Type": "application/octet-stream", "Content-Length": str(length)}
        params = {"version": version, "wait_sha256": str(wait_sha256).lower()}
        resp = self._request(
            "PUT",
            "/v1/weights",
            idempotent=False,
            retry_503=not isinstance(body, Iterator),
            params=params,
            content=body,
            headers=headers,
        )
        return WeightInfo.model_validate_json(resp.content)

    def served_version(self) -> int:
        """The served policy version from /readyz (never waits for a weight hash; 503 is retried)."""
        return int(self._request("GET", "/readyz", idempotent=True).json()["version"])

    def load_weights(self, path: str, version: int) -> WeightInfo:
        """Have the server load a safetensors checkpoint from storage it shares with the caller."""
        body = LoadWeightsRequest(path=path, version=version).model_dump()
        resp = self._request("POST", "/v1/weights/load", idempotent=False, json=body, headers=self._auth)
        return WeightInfo.model_validate_json(resp.content)

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 120.0, interval_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout service at {self._http.base_url} not ready after {timeout_s:.0f} s"
                )
            time.sleep(interval_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Sink:
    """One server's end of a fan-out: a bounded queue of buckets (backpressure), read by its request."""

    _END = None

    def __init__(self, depth: int) -> None:
        self.queue: queue.Queue[memoryview | BaseException | None] = queue.Queue(depth)
        self.closed = threading.Event()  # the request stopped reading (answered or failed)

    def put(self, item: memoryview | BaseException | None) -> None:
        """Queue `item`, waiting for room while the request still reads; dropped once it stopped."""
        while not self.closed.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.closed.set()
        while True:  # free the buckets still queued
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def pieces(self, piece: int) -> Iterator[memoryview]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            for start in range(0, len(item), piece):
                yield item[start : start + piece]


class PushAborted(Exception):
    """The sender failed mid-body (its tensors raised): the request is cut off, the server keeps its weights."""


def push_weights_stream(
    clients: Sequence[RolloutClient],
    specs: Sequence[NamedSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    *,
    bucket_bytes: int = BUCKET_BYTES,
    queue_buckets: int = 2,
    wait_sha256: bool = False,
    pool: ThreadPoolExecutor | None = None,
) -> list[WeightInfo | Exception]:
    """PUT the same weights to every client concurrently from ONE pass over `tensors`.

    The safetensors header comes from `specs` (names, shapes, dtypes, in the order `tensors` yields them);
    the data is cut into buckets of at most `bucket_bytes` as tensors arrive (weights_stream.iter_body) and
    each bucket is queued to every server still reading, `queue_buckets` deep: a slow server holds the pass
    back (backpressure), so at most about `(queue_buckets + 2) * bucket_bytes` of the body is ever held,
    never the serialised model. A server that answers early (a refusal) stops taking buckets; the pass goes
    on to its end regardless (under FSDP every rank takes part in each gather of `tensors`). Returns each
    server's WeightInfo or the exception its request raised, in order; raises if `tensors` raised (every
    request is then cut off, and the servers keep their weights).
    """
    prefix, length = encode_header(specs)
    sinks = [_Sink(max(1, queue_buckets)) for _ in clients]
    own_pool = pool is None
    executor = pool or ThreadPoolExecutor(max_workers=max(1, len(clients)), thread_name_prefix="push")

    def send(i: int) -> WeightInfo:
        try:
            return clients[i].put_weights_stream(
                sinks[i].pieces(PIECE_BYTES), length, version, wait_sha256=wait_sha256
            )
        finally:
            sinks[i].close()

    try:
        futures = [executor.submit(send, i) for i in range(len(clients))]
        try:
            for bucket in iter_body(prefix, specs, tensors, bucket_bytes):
                for sink in sinks:
                    sink.put(bucket)
            for sink in sinks:
                sink.put(_Sink._END)
        except BaseException as e:
            for sink in sinks:
                sink.put(PushAborted(f"push of version {version} aborted by the sender: {e!r}"))
            for f in futures:
                f.exception()  # wait: no request may outlive the pass
            raise
        results: list[WeightInfo | Exception] = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:
                results.append(e)
        return results
    finally:
        if own_pool:
            executor.shutdown(wait=True)


class AsyncRolloutClient:
    """asyncio client with the same retry rules, for callers that keep many requests in flight."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 3,
        tls_ca_file: str | None = None,
    ):
        self.retries = retries
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, verify=tls_verify(tls_ca_file)
        )

    async def _request(self, method: str, path: str, *, idempotent: bool, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = await self._http.request(method, path, **kw)
            except httpx.ConnectError:
                if last:
                    raise
            except httpx.TransportError:
                if last or not idempotent:
                    raise
            else:
                if resp.status_code != 503 or last:
                    return _check(resp)
            await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        body = req.model_dump(exclude_none=True)
        resp = await self._request("POST", "/v1/generate", idempotent=True, json=body)
        return GenerateResponse.model_validate_json(resp.content)

    async def weights(self) -> WeightInfo:
        resp = await self._request("GET", "/v1/weights", idempotent=True)
        return WeightInfo.model_validate_json(resp.content)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
