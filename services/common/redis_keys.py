"""Redis layout (DESIGN.md 3.3): one place that spells every key; connecting, and the one reconnect backoff."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")

CONSUMER_GROUP = "trainers"
# The Redis password when the URL carries none (compose/k8s secrets are files; `opd up` sets the variable).
REDIS_PASSWORD_ENV = "OPD_REDIS_PASSWORD"
REDIS_PASSWORD_FILE_ENV = "OPD_REDIS_PASSWORD_FILE"
RECORD_FIELD = b"rec"
# How long an append remembers a record id: longer than any retry of one write (a Redis outage included).
RECORD_MARKER_TTL_S = 6 * 3600


def experience_stream(run: str, task: str = "") -> str:
    """`opd:<run>:experience`, or `opd:<run>:experience:<task>` for a task's records (one stream per task,
    services/common/tasks.py)."""
    return f"opd:{run}:experience:{task}" if task else f"opd:{run}:experience"


def policy_version_key(run: str) -> str:
    return f"opd:{run}:policy_version"


def dead_letter_stream(run: str) -> str:
    return f"opd:{run}:dead"


def record_marker_key(run: str, record_id: str) -> str:
    """Set once when a record is appended (value: its entry id), so that a retried append is a no-op."""
    return f"opd:{run}:rid:{record_id}"


def redis_password(environ: Mapping[str, str] | None = None) -> str | None:
    """$OPD_REDIS_PASSWORD, else the content of the file $OPD_REDIS_PASSWORD_FILE names (stripped), else None."""
    env = os.environ if environ is None else environ
    if env.get(REDIS_PASSWORD_ENV):
        return env[REDIS_PASSWORD_ENV]
    path = env.get(REDIS_PASSWORD_FILE_ENV)
    if not path:
        return None
    password = Path(path).read_text().strip()
    if not password:
        raise ValueError(f"{REDIS_PASSWORD_FILE_ENV}: {path} is empty")
    return password


def redacted(url: str) -> str:
    """`url` with its password replaced by ***, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def connect(url: str, environ: Mapping[str, str] | None = None, **kwargs) -> redis.Redis:
    """A client with health checks and keepalive; callers retry on ConnectionError. A URL without a password
    authenticates with `redis_password(environ)` when one is set."""
    password = None if urlsplit(url).password is not None else redis_password(environ)
    if password is not None:
        kwargs["password"] = password
    kwargs = {"health_check_interval": 10, "socket_keepalive": True, "socket_timeout": 30, **kwargs}
    return redis.Redis.from_url(url, **kwargs)


def ensure_group(client: redis.Redis, run: str, task: str = "") -> None:
    """Create the consumer group (and the stream) if missing."""
    try:
        client.xgroup_create(experience_stream(run, task), CONSUMER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


class RedisDown(redis.ConnectionError):
    """Redis stayed unreachable past the deadline, or a stop was asked while waiting for it."""


def call_with_backoff(
    fn: Callable[[], T],
    *,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
    max_delay_s: float = 5.0,
    on_reconnect: Callable[[], None] | None = None,
) -> T:
    """Run a Redis command, retrying connection errors with exponential backoff (0.1 s up to `max_delay_s`)
    until Redis answers again: redis-py reconnects on the next command, and a restarted Redis with AOF keeps
    the streams. Gives up with `RedisDown` after `timeout_s` (None = never) or once `stop` is set.
    `on_reconnect` runs once when a command succeeds after a failure (e.g. to re-read a pending list).
    Only for idempotent commands, or ones made idempotent (the worker's append script)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay, down = 0.1, False
    while True:
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if stop is not None and stop.is_set():
                raise RedisDown(f"Redis unavailable during stop: {e}") from e
            if deadline is not None and time.monotonic() > deadline:
                raise RedisDown(f"Redis unavailable for more than {timeout_s:.0f} s: {e}") from e
            if not down:
                log.warning("Redis unavailable (%s); reconnecting with backoff", e)
                down = True
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
            continue
        if down:
            log.info("Redis is back")
            if on_reconnect is not None:
                on_reconnect()
        return result
