"""The worker's Redis side: append records to the task's experience stream, once each, with backpressure.

- Backpressure: an entry is appended only while the stream holds fewer than `max_backlog` entries. The
  check and the XADD run in one Lua script, so the bound holds exactly even with many workers; the worker
  never trims or drops unconsumed entries.
- Exactly once per record id: the script sets `opd:<run>:rid:<record_id>` with the XADD, so if the
  connection drops after Redis ran it but before its reply, the retry finds the marker and returns the
  first entry's id instead of appending the record again.
- Redis connection errors are retried with backoff until Redis is back (a restarted Redis with AOF keeps the
  stream), or until a stop is requested (then `Stopped`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from services.common.experience import ExperienceRecord, encode
from services.common.redis_keys import (
    RECORD_FIELD,
    RECORD_MARKER_TTL_S,
    RedisDown,
    call_with_backoff,
    ensure_group,
    experience_stream,
    record_marker_key,
)
from services.worker.metrics import WorkerMetrics
from services.worker.retry import Stopped

log = logging.getLogger(__name__)
T = TypeVar("T")

# Append once per record id, and only while the stream is below the bound. KEYS: stream, record marker;
# ARGV: max_backlog, field, data, marker ttl, nonce of this append() call. The marker holds "<nonce> <entry
# id>". Returns {entry id, nonce of the call that appended it}, or false (nil) when the stream is full: a
# retry after a lost reply sees its own nonce, a second append() of the same record another one.
_XADD_IF_ROOM = """
local first = redis.call('GET', KEYS[2])
if first then
  local sep = string.find(first, ' ', 1, true)
  return {string.sub(first, sep + 1), string.sub(first, 1, sep - 1)}
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local id = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[3])
redis.call('SET', KEYS[2], ARGV[5] .. ' ' .. id, 'EX', tonumber(ARGV[4]))
return {id, ARGV[5]}
"""


class RecordSink:
    """Appends to `opd:<run>:experience[:<task>]`; shared by the worker's pool threads."""

    def __init__(
        self,
        client: redis.Redis,
        run: str,
        task: str,
        max_backlog: int,
        metrics: WorkerMetrics,
        stop: threading.Event,
    ) -> None:
        self.redis, self.run, self.task = client, run, task
        self.stream = experience_stream(run, task)
        self.max_backlog = max_backlog
        self.metrics, self.stop = metrics, stop
        self._script = client.register_script(_XADD_IF_ROOM)
        self._lock = threading.Lock()
        self._blocked_since: float | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """A Redis command, retried through connection errors until Redis answers (or `Stopped`)."""
        try:
            return call_with_backoff(fn, stop=self.stop)
        except RedisDown as e:
            raise Stopped(str(e)) from e

    def ensure_group(self) -> None:
        self.call(lambda: ensure_group(self.redis, self.run, self.task))

    def append(self, record: ExperienceRecord) -> tuple[str, bool]:
        """Append `record` as one stream entry once the stream has room: (entry id, appended by this call).
        A record id written before (by an earlier call) is not appended again: (the first entry's id,
        False). `Stopped` when a stop comes while the stream is full or Redis is down."""
        keys = [self.stream, record_marker_key(self.run, record.record_id)]
        nonce = secrets.token_hex(8)  # tells this call's own lost-reply retry from an earlier append()
        args: list[bytes | str | int] = [
            self.max_backlog,
            RECORD_FIELD,
            encode(record),
            RECORD_MARKER_TTL_S,
            nonce,
        ]
        poll = 0.05
        while True:
            reply = self.call(lambda: self._script(keys=keys, args=args))
            if reply is not None:
                entry, owner = (x.decode() if isinstance(x, bytes) else str(x) for x in reply)
                break
            with self._lock:
                if self._blocked_since is None:
                    self._blocked_since = time.monotonic()
                    log.info(
                        "stream %s holds %d entries (max_backlog): waiting for the trainer",
                        self.stream,
                        self.max_backlog,
                    )
            if self.stop.is_set():
                raise Stopped("the stream is full")
            self.stop.wait(poll)  # then one more try before giving up
            poll = min(poll * 2, 1.0)
        if owner != nonce:
            log.warning(
                "record %s was already written as entry %s; not appended again", record.record_id, entry
            )
            return entry, False
        with self._lock:
            if self._blocked_since is not None:
                waited = time.monotonic() - self._blocked_since
                self.metrics.blocked_s.inc(waited)
                log.info("stream has room again after %.1f s; resuming", waited)
                self._blocked_since = None
        return entry, True

    def backlog(self) -> int | None:
        """The stream's length now, None while Redis is unreachable (for progress lines)."""
        try:
            return int(self.redis.xlen(self.stream))
        except (redis.ConnectionError, redis.TimeoutError):
            return None
