"""Python client of `opd.teacher.v1.TeacherService`: numpy arrays out, replicas, retries, deadlines.

    with TeacherClient(["10.0.0.5:50051", "10.0.0.6:50051"], token=...) as teacher:
        rows = teacher.score(sequences, score_from=prompt_lens, top_k=32)
        rows[i].topk_ids      # int32 [n_i - score_from_i, 32]

Targets: "host:port"; "dns:///name:port" (every address the name resolves to, round_robin); or a list of
addresses (one channel each; the client spreads requests over them and moves a request that found a
replica unavailable to the next one). Each channel retries UNAVAILABLE and RESOURCE_EXHAUSTED with
exponential backoff through gRPC's service-config retry policy. Errors surface as `grpc.RpcError`.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

I32, F32 = np.dtype("<i4"), np.dtype("<f4")
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
T = TypeVar("T")


@dataclass
class ScoredRows:
    """The teacher's answer for one sequence: rows = n - score_from positions."""

    topk_ids: np.ndarray  # int32 [rows, k], each row by descending log-probability
    topk_logprobs: np.ndarray  # float32 [rows, k]
    target_logprobs: np.ndarray  # float32 [rows], log q(x_t | x_<t)
    candidate_logprobs: np.ndarray | None  # float32 [rows, per_row], when candidates were sent


def service_config(max_retries: int) -> str:
    """round_robin over resolved addresses; retry overload/unavailability with exponential backoff."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "opd.teacher.v1.TeacherService"}],
                "retryPolicy": {
                    # gRPC caps attempts at 5 (4 retries); 1 attempt means no retry.
                    "maxAttempts": max(2, min(5, max_retries + 1)),
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2.0,
                    "retryableStatusCodes": list(RETRYABLE),
                },
            }
        ],
    }
    if max_retries <= 0:
        del config["methodConfig"][0]["retryPolicy"]
    return json.dumps(config)


def decode_scored(seq: teacher_pb2.ScoredSequence, rows: int, per_row: int | None) -> ScoredRows:
    """Check a ScoredSequence against what was asked and turn it into arrays (copies: writable)."""
    k = seq.k
    if (
        seq.rows != rows
        or len(seq.topk_ids) != 4 * rows * k
        or len(seq.topk_logprobs) != 4 * rows * k
        or len(seq.target_logprobs) != 4 * rows
    ):
        raise ValueError(
            f"teacher answered {seq.rows} rows x {k} (bytes {len(seq.topk_ids)}/"
            f"{len(seq.topk_logprobs)}/{len(seq.target_logprobs)}) for {rows} rows"
        )
    cand = None
    if per_row is not None:
        if len(seq.candidate_logprobs) != 4 * rows * per_row:
            raise ValueError(
                f"teacher answered {len(seq.candidate_logprobs)} candidate bytes for {rows} rows x {per_row}"
            )
        cand = np.frombuffer(seq.candidate_logprobs, dtype=F32).reshape(rows, per_row).astype(np.float32)
    return ScoredRows(
        topk_ids=np.frombuffer(seq.topk_ids, dtype=I32).reshape(rows, k).astype(np.int32),
        topk_logprobs=np.frombuffer(seq.topk_logprobs, dtype=F32).reshape(rows, k).astype(np.float32),
        target_logprobs=np.frombuffer(seq.target_logprobs, dtype=F32).astype(np.float32),
        candidate_logprobs=cand,
    )


def build_sequence(
    token_ids: Sequence[int] | np.ndarray, score_from: int, candidates: np.ndarray | None = None
) -> teacher_pb2.Sequence:
    seq = teacher_pb2.Sequence(
        token_ids=np.asarray(token_ids, dtype=np.int64).tolist(), score_from=int(score_from)
    )
    if candidates is not None:
        cand = np.asarray(candidates)
        seq.candidates.per_row = int(cand.shape[-1])
        seq.candidates.ids = cand.astype(I32).tobytes()
    return seq


class TeacherClient:
    def __init__(
        self,
        targets: str | list[str],
        token: str | None = None,
        timeout_s: float = 120.0,
        tls_ca_file: str | None = None,
        max_retries: int = 5,
    ):
        addresses = [targets] if isinstance(targets, str) else list(targets)
        if not addresses:
            raise ValueError("TeacherClient: no target addresses")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.service_config", service_config(max_retries)),
            ("grpc.enable_retries", 1),
            # Requests larger than the retry buffer are not retried; ours can be tens of MiB.
            ("grpc.per_rpc_retry_buffer_size", 256 << 20),
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            # A replica restarted after a crash rejoins within seconds, not gRPC's default 120 s backoff.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        creds = grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes()) if tls_ca_file else None
        self._channels = [
            grpc.secure_channel(a, creds, options=options)
            if creds
            else grpc.insecure_channel(a, options=options)
            for a in addresses
        ]
        self._stubs = [teacher_pb2_grpc.TeacherServiceStub(c) for c in self._channels]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._info: teacher_pb2.TeacherInfo | None = None

    # -- info --------------------------------------------------------------------------------------------

    def info(self) -> teacher_pb2.TeacherInfo:
        """GetInfo from one replica (cached after the first success)."""
        if self._info is None:
            info = self._call(
                lambda stub, timeout: stub.GetInfo(
                    teacher_pb2.GetInfoRequest(), timeout=timeout, metadata=self._metadata
                )
            )
            with self._lock:
                self._info = info
        return self._info

    @property
    def model_id(self) -> str:
        return self.info().model_id

    # -- score -------------------------------------------------------------------------------------------

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        score_from: Sequence[int],
        top_k: int,
        candidates: Sequence[np.ndarray | None] | None = None,
        temperature: float = 1.0,
        request_id: str = "",
    ) -> list[ScoredRows]:
        """Score every sequence from its score_from; one ScoredRows per sequence, in order.

        candidates[i]: int32 [rows_i, per_row] or [per_row] (same ids on every row), or None.
        The batch is cut into requests of at most max_request_tokens (and into at least one request per
        replica channel), sent concurrently; each is retried and, on UNAVAILABLE, moved to another channel.
        """
        if len(score_from) != len(sequences):
            raise ValueError(f"score_from has {len(score_from)} entries for {len(sequences)} sequences")
        if candidates is not None and len(candidates) != len(sequences):
            raise ValueError(f"candidates has {len(candidates)} entries for {len(sequences)} sequences")
        if not sequences:
            return []
        cands = list(candidates) if candidates is not None else [None] * len(sequences)
        protos = [build_sequence(s, f, c) for s, f, c in zip(sequences, score_from, cands, strict=True)]
        chunks = self._split([len(s) for s in sequences])
        temperature = float(temperature)
        futures = []
        for c, (a, z) in enumerate(chunks):
            request = teacher_pb2.ScoreRequest(
                sequences=protos[a:z],
                top_k=top_k,
                temperature=temperature,
                request_id=f"{request_id}/{c}" if len(chunks) > 1 else request_id,
            )
            futures.append(self._start(request))
        out: list[ScoredRows] = []
        for (a, z), fut in zip(chunks, futures, strict=True):
            response = fut.result()
            if len(response.results) != z - a:
                raise ValueError(f"teacher answered {len(response.results)} results for {z - a} sequences")
            for i, scored in zip(range(a, z), response.results, strict=True):
                per_row = None if cands[i] is None else int(np.asarray(cands[i]).shape[-1])
                out.append(decode_scored(scored, len(sequences[i]) - int(score_from[i]), per_row))
        return out

    def _split(self, lengths: list[int]) -> list[tuple[int, int]]:
        """[start, end) ranges of sequences: <= max_request_tokens each, >= one per channel if possible."""
        budget = self.info().max_request_tokens
        total = sum(lengths)
        if len(self._channels) > 1:
            budget = min(budget, max(1, -(-total // len(self._channels))))
        chunks, start, tokens = [], 0, 0
        for i, n in enumerate(lengths):
            if i > start and tokens + n > budget:
                chunks.append((start, i))
                start, tokens = i, 0
            tokens += n
        chunks.append((start, len(lengths)))
        return chunks

    # -- transport ---------------------------------------------------------------------------------------

    def _start(self, request: teacher_pb2.ScoreRequest) -> _Call:
        return _Call(self, request)

    def _pick(self) -> int:
        with self._lock:
            return next(self._next) % len(self._stubs)

    def _call(self, fn: Callable[[teacher_pb2_grpc.TeacherServiceStub, float], T]) -> T:
        """Blocking call on one channel after another until one answers (or a non-retryable error)."""
        first = self._pick()
        for attempt in range(len(self._stubs)):
            stub = self._stubs[(first + attempt) % len(self._stubs)]
            try:
                return fn(stub, self.timeout_s)
            except grpc.RpcError as e:
                if e.code().name not in RETRYABLE or attempt == len(self._stubs) - 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Call:
    """One Score request in flight: non-blocking start, failover to the next channel on result()."""

    def __init__(self, client: TeacherClient, request: teacher_pb2.ScoreRequest):
        self.client = client
        self.request = request
        self.first = client._pick()
        self.attempt = 0
        self.future = self._send()

    def _send(self):
        stubs = self.client._stubs
        stub = stubs[(self.first + self.attempt) % len(stubs)]
        return stub.Score.future(self.request, timeout=self.client.timeout_s, metadata=self.client._metadata)

    def result(self) -> teacher_pb2.ScoreResponse:
        while True:
            try:
                return self.future.result()
            except grpc.RpcError as e:
                self.attempt += 1
                if e.code().name not in RETRYABLE or self.attempt >= len(self.client._stubs):
                    raise
                self.future = self._send()
