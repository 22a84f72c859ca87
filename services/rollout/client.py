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
import random
import ssl
import struct
import time
from collections.abc import Iterator, Mapping

import httpx
import torch

from services.rollout.protocol import GenerateRequest, GenerateResponse, LoadWeightsRequest, WeightInfo


class RolloutError(Exception):
    """The rollout service answered with an error status; `detail` is its reason."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"rollout service: HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


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
            if tensor.dtype not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors encoding here")
            self.tensors[name] = tensor.detach()
        # larger elements first (as safetensors itself does): every tensor's offset stays aligned
        self.order = sorted(self.tensors, key=lambda n: (-self.tensors[n].element_size(), n))
        header, offset = {}, 0
        for name in self.order:
            t = self.tensors[name]
            size = t.numel() * t.element_size()
            header[name] = {
                "dtype": _ST_DTYPES[t.dtype],
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

    def _request(self, method: str, path: str, *, idempotent: bool, **kw) -> httpx.Response:
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
                if resp.status_code != 503 or last:
                    return _check(resp)
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def generate(self, req: GenerateRequest) -> GenerateResponse:
        body = req.model_dump(exclude_none=True)
        resp = self._request("POST", "/v1/generate", idempotent=True, json=body)
        return GenerateResponse.model_validate_json(resp.content)

    def weights(self) -> WeightInfo:
        return WeightInfo.model_validate_json(self._request("GET", "/v1/weights", idempotent=True).content)

    def put_weights(self, state_dict: Mapping[str, torch.Tensor] | bytes, version: int) -> WeightInfo:
        """Push the full state dict (or its safetensors bytes) as `version`."""
        body = _Pieces(state_dict) if isinstance(state_dict, bytes) else SafetensorsStream(state_dict)
        headers = {
            **self._auth,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(body.length),
        }
        resp = self._request(
            "PUT", "/v1/weights", idempotent=False, params={"version": version}, content=body, headers=headers
        )
        return WeightInfo.model_validate_json(resp.content)

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
