"""Teacher gRPC server: `run_server(cfg)` (tests, local pipeline) and `opd teacher serve` (`main`).

Startup: bind the port with health NOT_SERVING, load the model, then SERVING. Shutdown (SIGTERM/SIGINT or
leaving the context): health NOT_SERVING, new Score calls get UNAVAILABLE, in-flight work finishes within
`grace_s`, then the server stops. SIGHUP re-reads the tokens file (it is also re-read when it changes).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opd_teacher_client.v1 import teacher_pb2

from services.common.config import ConfigError, report_config_errors
from services.common.logs import setup_logging
from services.teacher.auth import Client, TokensFileError, TokenTable, run_as
from services.teacher.batcher import Batcher
from services.teacher.config import TeacherConfig, load_config
from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import Scorer, build_scorer
from services.teacher.servicer import Limits, TeacherServicer, add_to_server

log = logging.getLogger(__name__)
SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name
MAX_MESSAGE = 2**31 - 1


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` of a client in `tokens` (health checks exempt:
    probes send no metadata). A unary call runs with `auth.current_client()` set to its client."""

    def __init__(self, tokens: TokenTable, metrics: TeacherMetrics | None = None):
        self.tokens = tokens
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        client = self.tokens.authenticate(given if isinstance(given, str) else "")
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        if client is None:
            if self.metrics is not None:
                self.metrics.unauthenticated.inc()
            return _deny(handler, "missing or unknown bearer token in metadata `authorization`")
        return _as_client(handler, client)


def _as_client(handler: grpc.RpcMethodHandler, client: Client) -> grpc.RpcMethodHandler:
    """`handler` with its unary behaviour run as `client` (streams, i.e. reflection, need no client)."""
    if handler.request_streaming or handler.response_streaming:
        return handler
    behaviour = handler.unary_unary

    def call(request, context):
        return run_as(client, behaviour, request, context)

    return grpc.unary_unary_rpc_method_handler(
        call, handler.request_deserializer, handler.response_serializer
    )


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return kinds[(handler.request_streaming, handler.response_streaming)](abort)


def message_limits(cfg: TeacherConfig) -> tuple[int, int]:
    """(receive, send) byte limits that admit every request within the configured limits."""
    # Request: token ids as varints (<= 10 bytes) plus candidates; response: 8 bytes per top-K entry,
    # 4 per target, 4 per candidate, per row. 1 MiB covers framing and small fields.
    recv = cfg.max_request_tokens * (10 + 4 * cfg.max_candidates) + (1 << 20)
    send = cfg.max_request_tokens * (8 * cfg.max_top_k + 4 + 4 * cfg.max_candidates) + (1 << 20)
    return min(recv, MAX_MESSAGE), min(send, MAX_MESSAGE)


@dataclass
class ServerHandle:
    server: grpc.Server
    host: str
    port: int
    servicer: TeacherServicer
    health: health.HealthServicer
    metrics: TeacherMetrics
    grace_s: float
    tokens: TokenTable
    metrics_port: int = 0  # 0: no /metrics endpoint
    pool: ThreadPoolExecutor | None = None
    batcher: Batcher | None = None
    _drained: bool = False

    @property
    def address(self) -> str:
        """Where a client on this machine connects."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "[::]", "::") else self.host
        return f"{host}:{self.port}"

    def drain(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new work (UNAVAILABLE), let in-flight work finish, stop. Idempotent."""
        if self._drained:
            return
        self._drained = True
        grace = self.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        if self.batcher is not None:
            self.batcher.begin_drain()
            if not self.batcher.wait_idle(grace):
                log.warning("drain: in-flight requests still running after %.1f s; stopping anyway", grace)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        if self.batcher is not None:
            self.batcher.close(timeout=5.0)
        self.metrics.close()


def build_token_table(cfg: TeacherConfig) -> TokenTable:
    """The clients `cfg` admits; ConfigError when the token file or the tokens file is unusable."""
    try:
        return TokenTable(cfg.bearer_token(), cfg.tokens_file)
    except TokensFileError as e:
        raise ConfigError(f"tokens_file: {e}") from None


def _build_grpc_server(
    cfg: TeacherConfig,
    servicer: TeacherServicer,
    health_servicer: health.HealthServicer,
    tokens: TokenTable,
    metrics: TeacherMetrics,
) -> tuple[grpc.Server, ThreadPoolExecutor, int]:
    recv, send = message_limits(cfg)
    options = [
        ("grpc.max_receive_message_length", recv),
        ("grpc.max_send_message_length", send),
        ("grpc.so_reuseport", 0),
    ]
    if cfg.max_connection_age_s > 0:
        # Clients reconnect (and re-resolve DNS) periodically, so new replicas get traffic.
        options += [
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.grace_s * 1000)),
        ]
    # Every queued Score holds a thread while it waits; the extra threads keep GetInfo/health responsive.
    pool = ThreadPoolExecutor(max_workers=cfg.threads or cfg.max_queue + 8, thread_name_prefix="teacher-grpc")
    interceptors = [BearerTokenInterceptor(tokens, metrics)] if tokens.enabled else []
    server = grpc.server(pool, interceptors=interceptors, options=options)
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bind = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert_file and cfg.tls_key_file is not None:  # __post_init__: both or neither
        creds = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key_file).read_bytes(), Path(cfg.tls_cert_file).read_bytes())]
        )
        port = server.add_secure_port(bind, creds)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"could not bind {bind}")
    return server, pool, port


@contextmanager
def run_server(cfg: TeacherConfig, scorer: Scorer | None = None) -> Iterator[ServerHandle]:
    """Serve `cfg` until the block exits, then drain. Yields once the model is loaded (health SERVING).

    `scorer` (an HFScorer/VLLMScorer or other Scorer already built) lets tests and benchmarks share one model between
    servers; by default the config's backend is loaded, and closed on exit.
    """
    tokens = build_token_table(cfg)
    metrics = TeacherMetrics()
    limits = Limits(cfg.max_top_k, cfg.max_candidates, cfg.max_sequence_tokens, cfg.max_request_tokens)
    servicer = TeacherServicer(limits, metrics)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server, pool, port = _build_grpc_server(cfg, servicer, health_servicer, tokens, metrics)
    server.start()
    handle = ServerHandle(
        server,
        cfg.host,
        port,
        servicer,
        health_servicer,
        metrics,
        cfg.grace_s,
        tokens,
        cfg.metrics_port,
        pool,
    )
    owns_scorer = scorer is None
    try:
        if cfg.metrics_port:
            metrics.serve(cfg.host, cfg.metrics_port)
        log.info("teacher: bound %s:%d, loading %s (%s backend)", cfg.host, port, cfg.model, cfg.backend)
        if scorer is None:
            scorer = build_scorer(cfg)
        handle.batcher = Batcher(
            scorer.score,
            cfg.max_batch_tokens,
            cfg.batch_window_ms / 1000.0,
            cfg.max_queue,
            pads_batches=scorer.info.pads_batches,
            metrics=metrics,
            max_client_inflight=cfg.max_client_inflight,
        )
        servicer.ready(handle.batcher, scorer.info)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "teacher: serving %s (vocab %d) on %s:%d%s%s",
            scorer.info.model_id,
            scorer.info.vocab_size,
            cfg.host,
            port,
            " with TLS" if cfg.tls_cert_file else "",
            f" with {len(tokens.clients())} token client(s)" if tokens.enabled else "",
        )
        yield handle
    finally:
        handle.drain()
        if owns_scorer and scorer is not None:
            scorer.close()


@report_config_errors("opd teacher serve")
def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv)
    log = setup_logging("teacher")
    build_token_table(
        cfg
    )  # an unreadable or empty token file or a bad tokens file fails before the model loads
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    with run_server(cfg) as handle:
        signal.signal(signal.SIGHUP, lambda signum, _frame: handle.tokens.reload())
        log.info("teacher: ready on %s", handle.address)
        stop.wait()
        log.info("teacher: signal received, draining (grace %.0f s)", cfg.grace_s)
    log.info("teacher: stopped")
    return 0
