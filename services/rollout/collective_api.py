"""Control plane of the collective weight path (issue #16; data plane: collective.py).

    POST /v1/weights/collective/join    {addr, port, world_size, rank, backend, group_name, timeout_s}
    POST /v1/weights/collective/update  {group_name, update_id, version, specs, bucket_bytes, chunk_bytes}
    POST /v1/weights/collective/leave   {group_name}
    GET  /v1/weights/collective         the group this replica belongs to, or null

All but the GET need the weight token (401 wrong or missing, 403 none configured), like the other weight
routes. A join is a rendezvous: it returns once every rank (the trainer at rank 0) has joined, or 504 after
`timeout_s` (422 at once when nothing listens at addr:port); a new join replaces the replica's group. An update runs in two phases, through the trainer's
store: this replica first accepts or refuses (version above the served one, else 409; specs equal to the
served schema, else 422) and writes its verdict to the store, then waits for the trainer's go, which comes
only when every replica accepted: a refused update moves no byte anywhere. With the go it receives every
tensor into fresh memory and installs them with `engine.put_tensors` (validated, hashed, swapped
atomically), answering the WeightInfo. A failed transfer drops the group (502); the trainer forms a new one.

One join or update at a time (409 while one runs). The hf engine receives in this process; the vLLM engine
receives inside its worker (vllm_ext.py), where the weights live.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.rollout.api import ERRORS, get_engine, get_metrics, require_token
from services.rollout.collective import (
    CollectiveError,
    Group,
    Unreachable,
    connect_store,
    group_store,
    parse_dtype,
    plan_buckets,
    update_keys,
)
from services.rollout.engine import RolloutEngine, StagedWeights, WeightsError
from services.rollout.protocol import WeightInfo

log = logging.getLogger(__name__)

router = APIRouter()
_NAME = r"^[A-Za-z0-9._:-]{1,128}$"
_RESPONSES: dict[int | str, dict[str, Any]] = {**ERRORS, 422: ERRORS[409], 502: ERRORS[409], 504: ERRORS[409]}


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    addr: str = Field(min_length=1, max_length=255, description="the trainer's store address")
    port: int = Field(ge=1, le=65535, description="the trainer's store port")
    world_size: int = Field(ge=2, le=4096, description="trainer + replicas")
    rank: int = Field(ge=1, le=4095, description="this replica's rank (the trainer is 0)")
    backend: Literal["gloo", "nccl"]
    group_name: str = Field(pattern=_NAME)
    timeout_s: float = Field(120.0, gt=0, le=3600, description="rendezvous and per-transfer timeout")

    @model_validator(mode="after")
    def _rank_in_world(self) -> JoinRequest:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be below world_size {self.world_size}")
        return self


class GroupInfo(BaseModel):
    group_name: str
    rank: int
    world_size: int
    backend: str


class CollectiveUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group_name: str = Field(pattern=_NAME)
    update_id: str = Field(pattern=_NAME, description="names this update's keys in the trainer's store")
    version: int = Field(ge=0, le=2**63 - 1, description="must exceed the served version")
    specs: list[tuple[str, list[int], str]] = Field(
        min_length=1, max_length=1_000_000, description="[name, shape, dtype] of every tensor, in send order"
    )
    bucket_bytes: int = Field(64 << 20, ge=1 << 16, le=16 << 30)
    chunk_bytes: int = Field(4 << 20, ge=1 << 12, le=1 << 30)

    @field_validator("specs")
    @classmethod
    def _known_dtypes(cls, specs: list[tuple[str, list[int], str]]) -> list[tuple[str, list[int], str]]:
        seen: set[str] = set()
        for name, shape, dtype in specs:
            parse_dtype(dtype)
            if any(d < 0 for d in shape):
                raise ValueError(f"{name}: negative dimension in {shape}")
            if name in seen:
                raise ValueError(f"{name}: listed twice")
            seen.add(name)
        return specs

    def wire_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(name, tuple(shape), parse_dtype(dtype)) for name, shape, dtype in self.specs]


class LeaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group_name: str = Field(pattern=_NAME)


# ---------------------------------------------------------------------------------------------------------
# Membership: where the group lives (this process for hf, the vLLM worker for vllm)


class Member:
    """This replica's membership of one group: the store (for the update handshake) and the transfer."""

    def __init__(self, info: GroupInfo, store: Any, timeout_s: float) -> None:
        self.info, self.store, self.timeout_s = info, store, timeout_s

    def handshake(self, update_id: str, refusal: str | None) -> str:
        """Write this rank's verdict; unless refused, wait for the trainer's ("go" or "abort: ...")."""
        ack, go = update_keys(update_id, self.info.rank)
        self.store.set(ack, "ok" if refusal is None else f"refused: {refusal}")
        if refusal is not None:
            return "refused"
        self.store.wait([go], datetime.timedelta(seconds=self.timeout_s))
        return bytes(self.store.get(go)).decode()

    async def transfer(self, engine: RolloutEngine, req: CollectiveUpdateRequest) -> WeightInfo:
        raise NotImplementedError

    async def close(self, engine: RolloutEngine) -> None:
        raise NotImplementedError


class LocalMember(Member):
    """hf: the group in this process; received tensors go through `engine.put_tensors`."""

    def __init__(self, info: GroupInfo, group: Group) -> None:
        super().__init__(info, group.store, group.timeout_s)
        self.group = group

    async def transfer(self, engine: RolloutEngine, req: CollectiveUpdateRequest) -> WeightInfo:
        plan = plan_buckets(req.wire_specs(), req.bucket_bytes)
        tensors = await asyncio.to_thread(self.group.receive, plan, chunk_bytes=req.chunk_bytes)
        return await engine.put_tensors(tensors, req.version)

    async def close(self, engine: RolloutEngine) -> None:
        await asyncio.to_thread(self.group.close)


class WorkerMember(Member):
    """vllm: the group lives in the engine's worker (vllm_ext.py), which receives straight into its own
    device tensors and hashes them; the install then rides the engine's own swap (write lock, paused
    scheduler, prefix-cache reset, failure handling): `_install` reloads an empty path list, which the
    worker extension reads as "the staged collective tensors"."""

    def __init__(self, info: GroupInfo, store: Any, timeout_s: float, llm: Any) -> None:
        super().__init__(info, store, timeout_s)
        self.llm = llm

    async def transfer(self, engine: RolloutEngine, req: CollectiveUpdateRequest) -> WeightInfo:
        hash_names = list(engine.schema.specs)
        wire = [list(s) for s in req.specs]
        try:
            (sha, *_) = await self.llm.collective_rpc(
                "opd_collective_receive", args=(wire, req.bucket_bytes, req.chunk_bytes, hash_names)
            )
        except Exception as e:
            raise CollectiveError(f"receive in the vLLM worker failed: {e}") from e
        try:
            return await engine._swap(StagedWeights({}, str(sha), req.version))
        finally:
            await self.llm.collective_rpc("opd_collective_discard")

    async def close(self, engine: RolloutEngine) -> None:
        await self.llm.collective_rpc("opd_collective_leave")


@dataclass
class _State:
    member: Member | None = None
    busy: bool = False


def _state(app: FastAPI) -> _State:
    state: _State | None = getattr(app.state, "collective", None)
    if state is None:  # no await since the check: handlers run on one event loop, so this is race-free
        state = app.state.collective = _State()
    return state


def _claim(state: _State) -> None:
    if state.busy:
        raise HTTPException(409, "a collective join or update is already running on this replica")
    state.busy = True


async def _drop(state: _State, engine: RolloutEngine) -> None:
    member, state.member = state.member, None
    if member is not None:
        try:
            await member.close(engine)
        except Exception:
            log.exception("closing collective group %s", member.info.group_name)


# ---------------------------------------------------------------------------------------------------------
# Routes


@router.get("/v1/weights/collective", responses=ERRORS)
async def collective_info(request: Request) -> GroupInfo | None:
    member = _state(request.app).member
    return member.info if member is not None else None


@router.post("/v1/weights/collective/join", responses=_RESPONSES, dependencies=[Depends(require_token)])
async def collective_join(req: JoinRequest, request: Request) -> GroupInfo:
    """Join the trainer's group as `rank` (replacing any group this replica had); returns once all joined."""
    engine, state = get_engine(request), _state(request.app)
    device = _device(engine, req.backend)
    _claim(state)
    try:
        await _drop(state, engine)
        info = GroupInfo(
            group_name=req.group_name, rank=req.rank, world_size=req.world_size, backend=req.backend
        )
        try:
            state.member = await _join(engine, req, info, device)
        except Unreachable as e:
            raise HTTPException(422, f"could not join group {req.group_name!r}: {e}") from e
        except Exception as e:
            log.warning("joining weight group %s at %s:%d failed: %s", req.group_name, req.addr, req.port, e)
            raise HTTPException(
                504, f"could not join group {req.group_name!r} at {req.addr}:{req.port}: {e}"
            ) from e
        log.info(
            "joined weight group %s as rank %d of %d (%s)",
            req.group_name,
            req.rank,
            req.world_size,
            req.backend,
        )
        return info
    finally:
        state.busy = False


async def _join(
    engine: RolloutEngine, req: JoinRequest, info: GroupInfo, device: torch.device | None
) -> Member:
    args = (req.addr, req.port, req.world_size, req.rank, req.backend, req.group_name)
    if engine.backend == "vllm":
        llm = getattr(engine, "llm")  # noqa: B009 (VLLMEngine; not imported here: it needs vLLM)
        store = await asyncio.to_thread(connect_store, req.addr, req.port, req.timeout_s)
        await llm.collective_rpc("opd_collective_join", args=(*args, req.timeout_s))
        return WorkerMember(info, group_store(store, req.group_name), req.timeout_s, llm)
    group = await asyncio.to_thread(Group.join, *args, timeout_s=req.timeout_s, device=device)
    return LocalMember(info, group)


def _device(engine: RolloutEngine, backend: str) -> torch.device | None:
    """Where received tensors land: the CPU for gloo; the engine's GPU for nccl (422 without one)."""
    if backend != "nccl" or engine.backend == "vllm":  # vLLM: its worker picks its own device
        return None
    model = getattr(engine, "model", None)
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device) or device.type != "cuda":
        raise HTTPException(422, f"backend nccl needs the model on a CUDA device (it is on {device})")
    return device


@router.post("/v1/weights/collective/update", responses=_RESPONSES, dependencies=[Depends(require_token)])
async def collective_update(req: CollectiveUpdateRequest, request: Request) -> WeightInfo:
    """Accept (or refuse) the update, then receive every tensor from rank 0 and install them atomically."""
    engine, state = get_engine(request), _state(request.app)
    member = state.member
    if member is None or member.info.group_name != req.group_name:
        have = member.info.group_name if member is not None else "none"
        raise HTTPException(409, f"not a member of group {req.group_name!r} (member of: {have}): join first")
    _claim(state)
    start = time.perf_counter()
    try:
        status, refusal = _refusal(engine, req)
        try:
            verdict = await asyncio.to_thread(member.handshake, req.update_id, refusal)
        except Exception as e:  # the store is gone or the go never came: the trainer gave up
            await _drop(state, engine)
            raise HTTPException(502, f"no go from the trainer for update {req.update_id}: {e}") from e
        if refusal is not None:
            raise HTTPException(status, refusal)
        if verdict != "go":
            raise HTTPException(409, f"update {req.update_id} called off by the trainer: {verdict}")
        try:
            info = await member.transfer(engine, req)
        except CollectiveError as e:
            await _drop(state, engine)
            raise HTTPException(502, f"collective transfer failed (group dropped; rejoin): {e}") from e
    finally:
        state.busy = False
    get_metrics(request).observe_swap(info, time.perf_counter() - start)
    return info


def _refusal(engine: RolloutEngine, req: CollectiveUpdateRequest) -> tuple[int, str | None]:
    """(status, reason) when this replica cannot take the update, else (200, None). Cheap: no tensors."""
    if req.version <= engine.version:
        return 409, f"version {req.version} is not above the served version {engine.version}"
    shapes = {name: (shape, dtype) for name, shape, dtype in req.wire_specs()}
    try:
        engine.schema.validate(shapes)
    except WeightsError as e:
        return 422, str(e)
    return 200, None


@router.post("/v1/weights/collective/leave", responses=ERRORS, dependencies=[Depends(require_token)])
async def collective_leave(req: LeaveRequest, request: Request) -> dict[str, bool]:
    """Leave the group (the trainer closes it); another group's name leaves nothing."""
    engine, state = get_engine(request), _state(request.app)
    member = state.member
    if member is None or member.info.group_name != req.group_name:
        return {"left": False}
    _claim(state)
    try:
        await _drop(state, engine)
    finally:
        state.busy = False
    return {"left": True}
