"""Prometheus metrics of one teacher server (own registry, so several servers can live in one process).

opd_teacher_queue_depth                    requests admitted and not yet answered
opd_teacher_batch_sequences / _tokens      histograms of each forward's size
opd_teacher_forward_seconds                histogram of the scorer's time per forward
opd_teacher_scored_tokens_total            rows (positions) scored: rate() gives scored tokens/s
opd_teacher_input_tokens_total             tokens sent to the model (every sequence whole)
opd_teacher_prompt_tokens_requested_total  tokens before score_from, summed over sequences (G x P a group)
opd_teacher_prompt_tokens_computed_total   of those, the ones the model ran (P a group when it is shared)
opd_teacher_request_latency_seconds        Score latency as the server sees it, by status code
opd_teacher_requests_total{code}           Score calls by status code

Per client (label `client`: a name from the server's token table, "default" for the single token,
"anonymous" without auth; never a value from the network, so the label set is bounded by the tokens file):

opd_teacher_client_requests_total{client,code}   Score calls
opd_teacher_client_queue_depth{client}           requests admitted and not yet answered
opd_teacher_client_input_tokens_total{client}    tokens sent to the model for the client's sequences
opd_teacher_client_scored_tokens_total{client}   positions scored for the client
opd_teacher_client_rejected_total{client,reason} RESOURCE_EXHAUSTED at admission: client_limit, queue_full
opd_teacher_unauthenticated_total                calls refused for a missing or unknown token
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from services.teacher.scorer import ScoreItem, ScoreResult

POW2 = tuple(float(2**i) for i in range(0, 19))
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class TeacherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "opd_teacher_queue_depth", "requests admitted and not yet answered", registry=r
        )
        self.batch_sequences = Histogram(
            "opd_teacher_batch_sequences", "sequences per forward", buckets=POW2[:14], registry=r
        )
        self.batch_tokens = Histogram(
            "opd_teacher_batch_tokens", "tokens per forward", buckets=POW2, registry=r
        )
        self.forward_seconds = Histogram(
            "opd_teacher_forward_seconds", "scorer time per forward", buckets=LATENCY, registry=r
        )
        self.scored_tokens = Counter(
            "opd_teacher_scored_tokens", "positions scored (response rows)", registry=r
        )
        self.input_tokens = Counter("opd_teacher_input_tokens", "tokens sent to the model", registry=r)
        self.prompt_tokens_requested = Counter(
            "opd_teacher_prompt_tokens_requested",
            "tokens before score_from, summed over sequences",
            registry=r,
        )
        self.prompt_tokens_computed = Counter(
            "opd_teacher_prompt_tokens_computed",
            "tokens before score_from the model ran (a shared prompt once)",
            registry=r,
        )
        self.request_latency = Histogram(
            "opd_teacher_request_latency_seconds", "Score latency", ["code"], buckets=LATENCY, registry=r
        )
        self.requests = Counter("opd_teacher_requests", "Score calls by status code", ["code"], registry=r)
        self.client_requests = Counter(
            "opd_teacher_client_requests",
            "Score calls by client and status code",
            ["client", "code"],
            registry=r,
        )
        self.client_queue_depth = Gauge(
            "opd_teacher_client_queue_depth", "requests admitted and not yet answered", ["client"], registry=r
        )
        self.client_input_tokens = Counter(
            "opd_teacher_client_input_tokens", "tokens sent to the model", ["client"], registry=r
        )
        self.client_scored_tokens = Counter(
            "opd_teacher_client_scored_tokens", "positions scored (response rows)", ["client"], registry=r
        )
        self.client_rejected = Counter(
            "opd_teacher_client_rejected",
            "requests refused at admission (RESOURCE_EXHAUSTED)",
            ["client", "reason"],
            registry=r,
        )
        self.unauthenticated = Counter(
            "opd_teacher_unauthenticated", "calls refused for a missing or unknown token", registry=r
        )
        self._http: WSGIServer | None = None

    def observe_batch(
        self, items: Sequence[ScoreItem], seconds: float, results: Sequence[ScoreResult] | None = None
    ) -> None:
        """One forward; `results` (None when it failed) tell the prompt tokens actually computed."""
        tokens = sum(len(it.token_ids) for it in items)
        self.batch_sequences.observe(len(items))
        self.batch_tokens.observe(tokens)
        self.forward_seconds.observe(seconds)
        self.input_tokens.inc(tokens)
        self.scored_tokens.inc(sum(it.rows for it in items))
        if results is not None:
            self.prompt_tokens_requested.inc(sum(it.score_from for it in items))
            self.prompt_tokens_computed.inc(
                sum(
                    it.score_from if r.prompt_tokens_computed is None else r.prompt_tokens_computed
                    for it, r in zip(items, results, strict=True)
                )
            )

    def observe_client_batch(self, clients: Sequence[str], items: Sequence[ScoreItem]) -> None:
        """A forward that succeeded: `clients[i]` sent `items[i]`."""
        for client, it in zip(clients, items, strict=True):
            self.client_input_tokens.labels(client=client).inc(len(it.token_ids))
            self.client_scored_tokens.labels(client=client).inc(it.rows)

    def observe_request(self, code: str, seconds: float, client: str) -> None:
        self.requests.labels(code=code).inc()
        self.request_latency.labels(code=code).observe(seconds)
        self.client_requests.labels(client=client, code=code).inc()

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP on a side port (a daemon thread)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
