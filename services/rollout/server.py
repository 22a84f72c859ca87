"""`opd rollout serve`: parse the config, build the app, run uvicorn.

vLLM spawns processes: start this through a module with a `__main__` guard
(`python -m launcher.cli rollout serve ...` or the `opd` script), never from an interactive import.
`running_server` serves an app from a thread on a free loopback port (tests, benchmarks, local pipeline).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from services.common.config import report_config_errors
from services.common.logs import setup_logging
from services.rollout.app import build_app
from services.rollout.config import WEIGHTS_TOKEN_ENV, RolloutConfig, load_config

log = logging.getLogger(__name__)


@report_config_errors("opd rollout serve")
def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv)
    setup_logging("rollout")
    if cfg.resolve_token() is None and not cfg.insecure_no_token:
        log.warning(
            "no weight-update token (%s or --token-file): weight updates are refused", WEIGHTS_TOKEN_ENV
        )
    app = build_app(cfg)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=cfg.log_level,
            ssl_certfile=cfg.tls_cert_file,
            ssl_keyfile=cfg.tls_key_file,
        )
    )
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)  # a failed model load ends the process
    server.run()
    return 1 if app.state.load_error is not None else 0


@contextlib.contextmanager
def running_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0
) -> Iterator[str]:
    """Serve `app` with uvicorn in a daemon thread; yields its base URL and stops it on exit. HTTPS when the
    app's config names a certificate (`tls_cert_file`, `tls_key_file`)."""
    cfg: RolloutConfig = app.state.cfg
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            ssl_certfile=cfg.tls_cert_file,
            ssl_keyfile=cfg.tls_key_file,
        )
    )
    thread = threading.Thread(target=server.run, name="rollout-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("rollout server did not start")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if cfg.tls_cert_file else 'http'}://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
