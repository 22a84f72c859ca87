"""FastAPI app factory of the rollout service: `build_app(cfg)`; the engine loads in the lifespan.

The model loads in a background task so that /healthz answers at once and /readyz says when the model is
ready (503 until then). A failed load sets `app.state.load_error` (healthz turns 503) and calls
`app.state.on_fatal` if the server set one (the CLI server exits then). Nothing heavy happens at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.policy_files import is_dcp_checkpoint, latest_policy, read_dcp_model
from services.rollout.api import router
from services.rollout.body_limit import BodyLimit, route_limit
from services.rollout.client import state_dict_to_safetensors
from services.rollout.collective_api import router as collective_router
from services.rollout.config import RolloutConfig
from services.rollout.engine import (
    EngineUnavailable,
    RequestError,
    RolloutEngine,
    VersionConflict,
    WeightsError,
)
from services.rollout.metrics import RolloutMetrics
from services.rollout.request_counter import CountRequests

log = logging.getLogger(__name__)


async def create_engine(cfg: RolloutConfig) -> RolloutEngine:
    if cfg.backend == "vllm":
        from services.rollout.vllm_engine import VLLMEngine  # imports vLLM: only when asked for

        return await VLLMEngine.create(cfg)
    from services.rollout.hf_engine import HFEngine

    return await HFEngine.create(cfg)


def _checkpoint_body(engine: RolloutEngine, path: Path) -> bytes:
    """safetensors bytes of a trainer checkpoint's model (DCP, fp32 master weights) in the served dtypes."""
    try:
        schema = engine.schema
        dtypes = {name: dtype for name, (_, dtype) in schema.specs.items()}
        dtypes.update({alias: schema.specs[target][1] for alias, target in schema.aliases.items()})
        tensors = read_dcp_model(path, dtypes)
    except Exception as e:  # rotated out mid-read, or not a complete checkpoint
        raise WeightsError(f"unreadable trainer checkpoint {str(path)!r}: {e}") from e
    return state_dict_to_safetensors(tensors)


async def _resume(engine: RolloutEngine, directory: str) -> None:
    """Install the trainer's newest weights before the engine is published (until then every request gets
    503 and clients retry), so a restarted service never samples from the initial, stale weights."""
    for attempt in range(3):
        found = latest_policy(directory)
        if found is None:
            log.info("no weights in %s: serving the initial weights, version %d", directory, engine.version)
            return
        path, version = found
        if version <= engine.version:
            break
        try:
            if is_dcp_checkpoint(path):
                await engine.put_weights(await asyncio.to_thread(_checkpoint_body, engine, path), version)
            else:
                await engine.load_weights(str(path), version)
            break
        except WeightsError:
            # The trainer keeps only its newest files: this one may have been rotated out mid-read.
            if attempt == 2 or path.exists():
                raise
    log.info("resumed from %s: policy version %d", path, engine.version)


async def _load_engine(app: FastAPI, cfg: RolloutConfig) -> None:
    try:
        engine = await create_engine(cfg)
        if cfg.resume_from:
            await _resume(engine, cfg.resume_from)
    except Exception as e:
        log.exception("loading %s with the %s backend failed", cfg.model, cfg.backend)
        app.state.load_error = f"model load failed: {type(e).__name__}: {e}"
        on_fatal: Callable[[], None] | None = app.state.on_fatal
        if on_fatal is not None:
            on_fatal()
        return
    app.state.engine = engine
    app.state.metrics.policy_version.set(engine.version)
    app.state.metrics.ready.set(1)
    log.info(
        "ready: %s backend, policy version %d, %d parameters",
        engine.backend,
        engine.version,
        engine.schema.num_parameters,
    )


def build_app(cfg: RolloutConfig, engine: RolloutEngine | None = None) -> FastAPI:
    """The service app. Pass `engine` to serve an already built engine (its lifetime stays the caller's)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None if engine is not None else asyncio.create_task(_load_engine(app, cfg))
        try:
            yield
        finally:
            if loader is not None:
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
                if app.state.engine is not None:
                    await app.state.engine.close()
            app.state.metrics.ready.set(0)

    app = FastAPI(
        title="OPD rollout service",
        version="1",
        summary="Student sampling with behaviour logprobs; versioned, atomic weight updates (DESIGN.md 3.2)",
        lifespan=lifespan,
    )
    app.state.cfg = cfg
    app.state.engine = engine
    app.state.token = cfg.resolve_token()
    app.state.metrics = RolloutMetrics()
    app.state.load_error = None
    app.state.on_fatal = None
    if engine is not None:
        app.state.metrics.policy_version.set(engine.version)
        app.state.metrics.ready.set(1)
    app.include_router(router)
    app.include_router(collective_router)  # the collective weight path (collective_api.py)
    app.add_middleware(BodyLimit, limit_of=route_limit(cfg.max_request_bytes, cfg.max_weights_bytes))
    app.add_middleware(CountRequests, metrics=app.state.metrics)

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(VersionConflict)
    async def _conflict(request: Request, exc: VersionConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    return app
