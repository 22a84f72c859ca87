"""gRPC servicer of `opd.teacher.v1.TeacherService`: converts proto <-> numpy, validates, maps errors.

All logic lives in the scorer and the batcher. Status codes (the contract, see teacher.proto):
INVALID_ARGUMENT for bad input (message names the sequence and the reason), UNIMPLEMENTED for a feature
the backend lacks, RESOURCE_EXHAUSTED when the queue or the client's in-flight limit is full (the message
names the limit), UNAVAILABLE while loading or draining,
DEADLINE_EXCEEDED when the caller's deadline passes in the queue, INTERNAL only for a server fault.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

from services.teacher.auth import ANONYMOUS, current_client
from services.teacher.batcher import Batcher, ClientLimit, Draining, QueueFull
from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import ModelInfo, ScoreItem, ScoreResult, Unsupported

log = logging.getLogger(__name__)
Req = TypeVar("Req", teacher_pb2.ScoreRequest, teacher_pb2.GetInfoRequest)
I32, F32 = np.dtype("<i4"), np.dtype("<f4")
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


class InvalidRequest(ValueError):
    """Bad input (maps to INVALID_ARGUMENT); the message names the sequence and the reason."""


@dataclass(frozen=True)
class Limits:
    max_top_k: int
    max_candidates: int
    max_sequence_tokens: int
    max_request_tokens: int


def parse_request(request: teacher_pb2.ScoreRequest, limits: Limits, info: ModelInfo) -> list[ScoreItem]:
    """Validate a ScoreRequest and convert it to ScoreItems. Raises InvalidRequest or Unsupported."""
    if not request.sequences:
        raise InvalidRequest("request has no sequences")
    max_top_k = min(limits.max_top_k, info.vocab_size)
    if not 1 <= request.top_k <= max_top_k:
        raise InvalidRequest(f"top_k={request.top_k} outside [1, {max_top_k}] (max_top_k, vocabulary size)")
    temperature = request.temperature
    # Bounded so that logits / temperature stays finite in float32.
    if not math.isfinite(temperature) or (
        temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE
    ):
        raise InvalidRequest(
            f"temperature={temperature} outside [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (0 means 1.0)"
        )
    temperature = temperature or 1.0
    if temperature != 1.0 and not info.supports_temperature:
        raise Unsupported(
            f"temperature={temperature}: the {info.backend} backend only scores at temperature 1 "
            "(TeacherInfo.supports_temperature is false)"
        )
    total = sum(len(seq.token_ids) for seq in request.sequences)
    if total > limits.max_request_tokens:
        raise InvalidRequest(
            f"request has {total} tokens in {len(request.sequences)} sequences, over "
            f"max_request_tokens={limits.max_request_tokens}; split it"
        )
    return [
        _parse_sequence(i, seq, request.top_k, temperature, limits, info)
        for i, seq in enumerate(request.sequences)
    ]


def _parse_sequence(
    i: int, seq: teacher_pb2.Sequence, top_k: int, temperature: float, limits: Limits, info: ModelInfo
) -> ScoreItem:
    n = len(seq.token_ids)
    if n == 0:
        raise InvalidRequest(f"sequence {i}: empty")
    if n > limits.max_sequence_tokens:
        raise InvalidRequest(
            f"sequence {i}: {n} tokens, over max_sequence_tokens={limits.max_sequence_tokens}"
        )
    s = seq.score_from
    if not 1 <= s < n:
        raise InvalidRequest(f"sequence {i}: score_from={s} outside [1, {n}) (a sequence of {n} tokens)")
    ids = np.fromiter(seq.token_ids, dtype=np.int64, count=n)
    bad = np.flatnonzero((ids < 0) | (ids >= info.vocab_size))
    if bad.size:
        p = int(bad[0])
        raise InvalidRequest(
            f"sequence {i}: token id {int(ids[p])} at position {p} outside [0, {info.vocab_size})"
        )
    candidates = None
    if seq.HasField("candidates"):
        if not info.supports_candidates:
            raise Unsupported(
                f"sequence {i}: candidates are not supported by the {info.backend} backend "
                "(TeacherInfo.supports_candidates is false)"
            )
        candidates = _parse_candidates(i, seq.candidates, n - s, limits, info)
    return ScoreItem(ids.astype(np.int32), s, top_k, temperature, candidates)


def _parse_candidates(
    i: int, cand: teacher_pb2.CandidateIds, rows: int, limits: Limits, info: ModelInfo
) -> np.ndarray:
    c = cand.per_row
    if c < 1:
        raise InvalidRequest(f"sequence {i}: candidates.per_row must be >= 1")
    if c > limits.max_candidates:
        raise InvalidRequest(
            f"sequence {i}: candidates.per_row={c} over max_candidates={limits.max_candidates}"
        )
    if len(cand.ids) % 4:
        raise InvalidRequest(f"sequence {i}: candidates.ids has {len(cand.ids)} bytes, not whole int32s")
    ids = np.frombuffer(cand.ids, dtype=I32)
    if ids.size == c:
        shaped = ids.copy()  # [C]: the same ids on every row
    elif ids.size == rows * c:
        shaped = ids.reshape(rows, c).copy()
    else:
        raise InvalidRequest(
            f"sequence {i}: candidates.ids holds {ids.size} ids; expected per_row={c} or "
            f"rows*per_row={rows}*{c}={rows * c}"
        )
    bad = np.flatnonzero((shaped < 0) | (shaped >= info.vocab_size))
    if bad.size:
        raise InvalidRequest(
            f"sequence {i}: candidate id {int(shaped.flat[bad[0]])} outside [0, {info.vocab_size})"
        )
    return shaped.astype(np.int32)


def encode_result(r: ScoreResult) -> teacher_pb2.ScoredSequence:
    rows, k = r.topk_ids.shape
    out = teacher_pb2.ScoredSequence(
        rows=rows,
        k=k,
        topk_ids=r.topk_ids.astype(I32, copy=False).tobytes(),
        topk_logprobs=r.topk_logprobs.astype(F32, copy=False).tobytes(),
        target_logprobs=r.target_logprobs.astype(F32, copy=False).tobytes(),
    )
    if r.candidate_logprobs is not None:
        out.candidate_logprobs = r.candidate_logprobs.astype(F32, copy=False).tobytes()
    return out


def info_message(info: ModelInfo, limits: Limits) -> teacher_pb2.TeacherInfo:
    return teacher_pb2.TeacherInfo(
        model_id=info.model_id,
        vocab_size=info.vocab_size,
        max_top_k=min(limits.max_top_k, info.vocab_size),
        max_sequence_tokens=limits.max_sequence_tokens,
        max_request_tokens=limits.max_request_tokens,
        tokenizer_sha256=info.tokenizer_sha256,
        special_token_ids=list(info.special_token_ids),
        backend=info.backend,
        supports_candidates=info.supports_candidates,
        supports_temperature=info.supports_temperature,
        max_candidates=limits.max_candidates,
    )


def add_to_server(servicer: TeacherServicer, server: grpc.Server) -> None:
    """Register the service with handlers that parse their requests themselves: bytes that are no valid
    message get INVALID_ARGUMENT, where gRPC's own deserializer answers INTERNAL and logs a traceback."""

    def parsed(
        method: Callable[[Req, grpc.ServicerContext], Message], message_cls: type[Req]
    ) -> grpc.RpcMethodHandler:
        def handle(raw: bytes, context: grpc.ServicerContext) -> Message:
            try:
                request = message_cls.FromString(raw)
            except DecodeError as e:
                _abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed {message_cls.DESCRIPTOR.name}: {e}"
                )
            return method(request, context)

        return grpc.unary_unary_rpc_method_handler(
            handle, response_serializer=lambda m: m.SerializeToString()
        )

    name = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name
    handlers = {
        "Score": parsed(servicer.Score, teacher_pb2.ScoreRequest),
        "GetInfo": parsed(servicer.GetInfo, teacher_pb2.GetInfoRequest),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """`context.abort`, which always raises (grpc ships no type hints that would tell mypy so)."""
    context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")


class TeacherServicer(teacher_pb2_grpc.TeacherServiceServicer):
    """Answers UNAVAILABLE until `ready` is called (the model loads after the port is bound)."""

    def __init__(self, limits: Limits, metrics: TeacherMetrics):
        self.limits = limits
        self.metrics = metrics
        self.batcher: Batcher | None = None
        self.info: ModelInfo | None = None
        self._info_pb: teacher_pb2.TeacherInfo | None = None

    def ready(self, batcher: Batcher, info: ModelInfo) -> None:
        self.info = info
        self._info_pb = info_message(info, self.limits)
        self.batcher = batcher

    def GetInfo(
        self, request: teacher_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.TeacherInfo:
        if self._info_pb is None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "teacher model is loading")
        return self._info_pb

    def Score(
        self, request: teacher_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.ScoreResponse:
        t0 = time.perf_counter()
        client = current_client()  # None: the server has no tokens
        name = ANONYMOUS if client is None else client.name
        limit = None if client is None else client.max_inflight
        code, response, message = self._score(request, context, name, limit)
        self.metrics.observe_request(code.name, time.perf_counter() - t0, name)
        if code is not grpc.StatusCode.OK:
            log.log(
                logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.DEBUG,
                "Score %s client=%s request_id=%r: %s",
                code.name,
                name,
                request.request_id,
                message,
            )
            _abort(context, code, message)
        assert response is not None  # OK comes with a response
        return response

    def _score(
        self,
        request: teacher_pb2.ScoreRequest,
        context: grpc.ServicerContext,
        client: str,
        max_inflight: int | None,
    ) -> tuple[grpc.StatusCode, teacher_pb2.ScoreResponse | None, str]:
        batcher, info = self.batcher, self.info
        if batcher is None or info is None:
            return grpc.StatusCode.UNAVAILABLE, None, "teacher model is loading"
        try:
            items = parse_request(request, self.limits, info)
        except InvalidRequest as e:
            return grpc.StatusCode.INVALID_ARGUMENT, None, str(e)
        except Unsupported as e:
            return grpc.StatusCode.UNIMPLEMENTED, None, str(e)
        try:
            ticket = batcher.submit(items, client, max_inflight)
        except QueueFull as e:  # ClientLimit included
            reason = "client_limit" if isinstance(e, ClientLimit) else "queue_full"
            self.metrics.client_rejected.labels(client=client, reason=reason).inc()
            return grpc.StatusCode.RESOURCE_EXHAUSTED, None, str(e)
        except Draining as e:
            return grpc.StatusCode.UNAVAILABLE, None, str(e)
        # The caller may go away (deadline, cancel): drop its queued work.
        context.add_callback(lambda: batcher.cancel(ticket))
        try:
            results = ticket.future.result(timeout=context.time_remaining())
        except FutureTimeout:
            batcher.cancel(ticket)
            return grpc.StatusCode.DEADLINE_EXCEEDED, None, "deadline passed while queued or scoring"
        except CancelledError:
            return grpc.StatusCode.CANCELLED, None, "request cancelled"
        except Unsupported as e:
            return grpc.StatusCode.UNIMPLEMENTED, None, str(e)
        except Exception as e:
            return grpc.StatusCode.INTERNAL, None, f"scorer failed: {type(e).__name__}: {e}"
        response = teacher_pb2.ScoreResponse(
            results=[encode_result(r) for r in results], model_id=info.model_id
        )
        return grpc.StatusCode.OK, response, ""
