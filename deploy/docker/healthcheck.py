#!/usr/bin/env python3
"""Container health check (Dockerfile HEALTHCHECK): probe the `opd` process that runs in this container.

It finds the process, rebuilds that process's config exactly as the process did (same arguments, same
environment, same `--config` file), and probes the port the config names, so a port changed in the TOML
or the environment never leaves the health check on a stale one:

    opd teacher serve   grpc.health.v1 Check("") on 127.0.0.1:<port> answers SERVING (over TLS when the
                        config has tls_cert_file: verified against OPD_HEALTHCHECK_TLS_CA_FILE, else the
                        system CAs, for the name OPD_HEALTHCHECK_TLS_SERVER_NAME, default localhost)
    opd rollout serve   GET http://127.0.0.1:<port>/readyz answers 200 (a weight version is loaded)
    opd rollout work    GET /metrics on <metrics_port> answers 200 when metrics_port is set, else Redis PING
    opd train           Redis PING on <redis_url>

A worker of a tasks file gets its task's table merged over [worker] (`OPD_WORKER_TASK`), as its process
does: each module's `load_config` is the process's own loader.

Exit status 0: healthy; 1: unhealthy or no `opd` process (the reason on stderr). Compose and plain
`docker run` use it as the image's HEALTHCHECK, and the Kubernetes teacher probes run it (exec probes), so
that a teacher with TLS is probed over TLS.
"""

from __future__ import annotations

import importlib
import os
import ssl
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `opd` command -> (config module, config class): the processes the images run (launcher/cli.py). Each
# module's `load_config(argv, env)` builds the config exactly as the process did, task overlay included.
CONFIG_CLASSES: dict[tuple[str, ...], tuple[str, str]] = {
    ("teacher", "serve"): ("services.teacher.config", "TeacherConfig"),
    ("rollout", "serve"): ("services.rollout.config", "RolloutConfig"),
    ("rollout", "work"): ("services.worker.config", "WorkerConfig"),
    ("train",): ("trainer.config", "TrainerConfig"),
}
TIMEOUT_S = 5.0
# The probe dials 127.0.0.1, while the teacher's certificate names the address clients use: the CA to
# verify it with and the name to expect, read from the process's environment.
TLS_CA_FILE_ENV = "OPD_HEALTHCHECK_TLS_CA_FILE"
TLS_SERVER_NAME_ENV = "OPD_HEALTHCHECK_TLS_SERVER_NAME"
DEFAULT_TLS_SERVER_NAME = "localhost"


class Unhealthy(RuntimeError):
    pass


@dataclass
class OpdProcess:
    pid: int
    command: tuple[str, ...]  # e.g. ("teacher", "serve")
    args: list[str]  # the arguments after the command
    environ: dict[str, str]


def config_class(command: tuple[str, ...]) -> type:
    module, name = CONFIG_CLASSES[command]
    return getattr(importlib.import_module(module), name)


def split_opd_argv(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(command, args) if argv runs `opd <command> ...` (directly or as `python .../opd ...`), else None."""
    for i, word in enumerate(argv[:3]):
        if os.path.basename(word) == "opd":
            rest = argv[i + 1 :]
            for n in (2, 1):
                if tuple(rest[:n]) in CONFIG_CLASSES:
                    return tuple(rest[:n]), rest[n:]
    return None


def find_opd_process(proc: Path = Path("/proc")) -> OpdProcess:
    for entry in sorted(proc.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            found = split_opd_argv(argv)
            if found is None:
                continue
            raw_env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile, or is not ours
            continue
        environ = dict(item.decode().split("=", 1) for item in raw_env if b"=" in item)
        return OpdProcess(int(entry.name), found[0], found[1], environ)
    raise Unhealthy("no `opd` process is running")


def process_config(p: OpdProcess) -> Any:
    """The config the process built: its flags over its environment over its task's table (if any) over its
    `--config` TOML section, by the process's own loader."""
    module, _ = CONFIG_CLASSES[p.command]
    return importlib.import_module(module).load_config(p.args, env=p.environ)


@dataclass
class GrpcTls:
    ca_file: str | None  # None: the system CAs
    server_name: str  # the name the server's certificate must carry


def grpc_tls(cfg: Any, environ: dict[str, str]) -> GrpcTls | None:
    """TLS settings for probing a teacher whose config is `cfg`; None when it serves plaintext."""
    if not cfg.tls_cert_file:
        return None
    return GrpcTls(
        environ.get(TLS_CA_FILE_ENV) or None,
        environ.get(TLS_SERVER_NAME_ENV) or DEFAULT_TLS_SERVER_NAME,
    )


def check_grpc(target: str, tls: GrpcTls | None = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        try:
            roots = Path(tls.ca_file).read_bytes() if tls.ca_file else None
        except OSError as e:
            raise Unhealthy(f"{TLS_CA_FILE_ENV}: cannot read {tls.ca_file!r}: {e.strerror}") from e
        channel = grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=roots),
            options=[("grpc.ssl_target_name_override", tls.server_name)],
        )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as e:
            raise Unhealthy(f"grpc health {target}: {e.code().name} {e.details()}") from e
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(
            f"grpc health {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        )


def check_http(url: str) -> None:
    # The probe dials its own process on loopback, while the certificate names the service's public name:
    # check that the server answers, not who it is.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as resp:
            status = resp.status
    except OSError as e:  # URLError and HTTPError (4xx/5xx) are OSErrors
        raise Unhealthy(f"GET {url}: {e}") from e
    if status != 200:
        raise Unhealthy(f"GET {url}: HTTP {status}")


def check_redis(url: str, environ: dict[str, str]) -> None:
    """PING with the process's Redis password (its URL's, else OPD_REDIS_PASSWORD[_FILE] in its environment)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from services.common.redis_keys import connect

    # No retries: a probe reports the state now; the next probe is the retry.
    client = connect(
        url,
        environ,
        socket_timeout=TIMEOUT_S,
        socket_connect_timeout=TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    try:
        client.ping()
    except redis.RedisError as e:
        raise Unhealthy(f"redis PING: {e}") from e
    finally:
        client.close()


def check(p: OpdProcess) -> str:
    """Probe the process; returns what was checked, raises Unhealthy."""
    cfg = process_config(p)
    if p.command == ("teacher", "serve"):
        target = f"127.0.0.1:{cfg.port}"
        tls = grpc_tls(cfg, p.environ)
        check_grpc(target, tls)
        return f"teacher grpc{'+tls' if tls else ''} {target} SERVING"
    if p.command == ("rollout", "serve"):
        url = f"{'https' if cfg.tls_cert_file else 'http'}://127.0.0.1:{cfg.port}/readyz"
        check_http(url)
        return f"rollout {url} ready"
    if p.command == ("rollout", "work") and cfg.metrics_port:
        url = f"http://127.0.0.1:{cfg.metrics_port}/metrics"
        check_http(url)
        return f"worker {url} up"
    check_redis(cfg.redis_url, p.environ)
    return f"{' '.join(p.command)}: redis reachable"


def main(proc: Path = Path("/proc")) -> int:
    try:
        p = find_opd_process(proc)
        print(f"healthy: {check(p)}")
        return 0
    except Unhealthy as e:
        print(f"unhealthy: {e}", file=sys.stderr)
    except Exception as e:  # a config the process could not build either: report, never crash the probe
        print(f"unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
