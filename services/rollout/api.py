"""HTTP routes of the rollout service (DESIGN.md 3.2). Handlers only translate; the engine does the work.

Errors: bad input 422 (the engine's RequestError/WeightsError, or pydantic's validation), stale version
409, missing/wrong token 401, weight updates without a configured token 403, body too large 413, engine
not loaded or failed 503 (clients retry).

`PUT /v1/weights` streams: the version is checked before the body is read, the safetensors header is
checked against the served model before any data is read, and the data is copied into per-tensor buffers
as it arrives (services/rollout/weights_stream.py). A refusal before the end of the body answers at once
with `Connection: close`, so that the sender stops instead of sending the rest of a multi-GB body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from services.rollout.engine import EngineUnavailable, RolloutEngine, VersionConflict, WeightsError
from services.rollout.metrics import RolloutMetrics
from services.rollout.protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    LoadWeightsRequest,
    WeightInfo,
)
from services.rollout.weights_stream import Header, receive_safetensors

router = APIRouter()
DISCONNECT_POLL_S = 0.25  # how often a running /v1/generate checks that its client is still there
bearer = HTTPBearer(auto_error=False, description="weight-update token (OPD_WEIGHTS_TOKEN)")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 409, 413, 503)
}
SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "description": "safetensors bytes of the full state dict (names, shapes, dtypes of the served model)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def get_engine(request: Request) -> RolloutEngine:
    engine: RolloutEngine | None = request.app.state.engine
    if engine is None:
        raise EngineUnavailable(request.app.state.load_error or "model is loading")
    return engine


def get_metrics(request: Request) -> RolloutMetrics:
    return request.app.state.metrics


def require_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Weight updates need the configured bearer token (constant-time compare; never logged)."""
    expected: str | None = request.app.state.token
    if expected is None:
        if request.app.state.cfg.insecure_no_token:
            return
        raise HTTPException(403, "weight updates are disabled: no token configured (set OPD_WEIGHTS_TOKEN)")
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


@router.post("/v1/generate", responses=ERRORS)
async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
    """Sample `n` completions per prompt; logprobs are under the full temperature-1 distribution."""
    engine, start = get_engine(request), time.perf_counter()
    task = asyncio.ensure_future(engine.generate(req))
    # A client that goes away (its timeout, a retry, a dead worker) must not leave the engine generating for
    # nobody: watch for the disconnect and cancel, which stops decoding at its next step (engine.py).
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            get_metrics(request).abandoned.inc()
            # nobody reads this answer; 499 (nginx's "client closed request") labels it in the request counter
            return Response(status_code=499)  # type: ignore[return-value]
    resp = task.result()
    get_metrics(request).observe_generate(resp, time.perf_counter() - start)
    return resp


@router.get("/v1/weights", responses=ERRORS)
async def get_weights(request: Request) -> WeightInfo:
    """The served version and sha256 (waits for a hash still being computed after a streamed PUT)."""
    return await get_engine(request).settled_weight_info()


@router.put(
    "/v1/weights", responses=ERRORS, openapi_extra=SAFETENSORS_BODY, dependencies=[Depends(require_token)]
)
async def put_weights(
    request: Request,
    version: int = Query(ge=0, le=2**63 - 1, description="must exceed the served version"),
    wait_sha256: bool = Query(
        True,
        description="answer once the sha256 of the new weights is computed (it runs after the swap); "
        'false: answer right after the swap with sha256 "" (GET /v1/weights waits for it)',
    ),
) -> WeightInfo:
    """Replace the served weights: streamed in, validated before any data is read, then swapped in."""
    engine, start = get_engine(request), time.perf_counter()
    try:
        engine.check_version(version)  # before a byte of the body is read
        tensors = await receive_safetensors(request.stream(), header_check(request, engine))
    except (WeightsError, VersionConflict) as e:
        # the rest of the body is not read: close, so that the sender stops (and the reason reaches it)
        status = 409 if isinstance(e, VersionConflict) else 422
        raise HTTPException(status, str(e), headers={"Connection": "close"}) from e
    info = await engine.put_received(tensors, version, wait_sha256=wait_sha256)
    get_metrics(request).observe_swap(info, time.perf_counter() - start)
    return info


def header_check(request: Request, engine: RolloutEngine) -> Callable[[Header], None]:
    """What a PUT body's safetensors header must satisfy before its data is read: the length it implies
    within max_weights_bytes (413) and equal to any Content-Length, and its tensors the served model's."""
    limit: int = request.app.state.cfg.max_weights_bytes
    declared = request.headers.get("content-length")

    def check(header: Header) -> None:
        if header.length > limit:
            raise HTTPException(
                413,
                f"body of {header.length} bytes (per its safetensors header) exceeds max_weights_bytes {limit}",
                headers={"Connection": "close"},
            )
        if declared is not None and int(declared) != header.length:
            raise WeightsError(
                f"Content-Length {declared} differs from the {header.length} bytes the safetensors header "
                "declares"
            )
        engine.schema.validate(header.specs)

    return check


@router.post("/v1/weights/load", responses=ERRORS, dependencies=[Depends(require_token)])
async def load_weights(req: LoadWeightsRequest, request: Request) -> WeightInfo:
    """Load a safetensors checkpoint from storage the server shares (a file or a directory)."""
    engine, start = get_engine(request), time.perf_counter()
    info = await engine.load_weights(req.path, req.version, request.app.state.cfg.weights_dir)
    get_metrics(request).observe_swap(info, time.perf_counter() - start)
    return info


@router.get("/healthz", responses=ERRORS)
async def healthz(request: Request) -> dict[str, str]:
    """Liveness: 503 when the model failed to load or a weight install failed (restart to recover)."""
    engine: RolloutEngine | None = request.app.state.engine
    failure = request.app.state.load_error or (engine.failure if engine is not None else None)
    if failure is not None:
        raise EngineUnavailable(failure)
    return {"status": "ok"}


@router.get("/readyz", responses=ERRORS)
async def readyz(request: Request) -> dict[str, str | int]:
    """Readiness: the model is loaded and serving."""
    engine = get_engine(request)
    if not engine.ready:
        raise EngineUnavailable(engine.failure or "not ready")
    return {"status": "ready", "backend": engine.backend, "version": engine.version}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    engine: RolloutEngine | None = request.app.state.engine
    get_metrics(request).ready.set(int(engine is not None and engine.ready))
    return Response(get_metrics(request).render(), media_type=CONTENT_TYPE_LATEST)
