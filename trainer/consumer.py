"""Reading experience from the Redis stream `opd:<run>:experience` as consumer group "trainers".

`StreamConsumer` is the Redis side: XREADGROUP of new entries, recovery of this consumer's pending entries
after a restart, dead-lettering, and XACK + XDEL (one MULTI transaction, so an entry is never acked without
being deleted or the reverse). `ExperienceReader` turns entries into batches: decode, check, drop stale
records, and stop once the batch holds at least `batch_size` sequences.

Acknowledgement policy (exactly-once, trainer/checkpoint.py): entries used by a batch (trained or dropped as
stale) are acked only after the checkpoint that lists them is committed. Entries that cannot be decoded or
used are moved to the dead-letter stream `opd:<run>:dead` with the reason, in the same transaction as their
ack + delete.

Recovery: the consumer name is stable across restarts, so the entries this trainer had read but not acked
are still in its pending list; `pending()` reads them back (XREADGROUP from id 0, the consumer's own
history). `claim_orphans(min_idle_ms)` additionally takes over (XAUTOCLAIM) entries other consumer names left
pending for that long, for a trainer renamed after a crash; it is off by default because a live consumer's
in-flight entries must not be stolen.

Redis restarts: every command retries connection errors with backoff for up to `down_timeout_s` (redis-py
reconnects on the next command). A read whose reply was lost in the restart has still moved its entries
into this consumer's pending list, so after a reconnect the consumer reads its pending list back and
returns the entries it never saw; entries it already holds are never returned twice.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.typing import EncodableT, FieldT

from services.common import redis_keys
from services.common.experience import ExperienceDecodeError, ExperienceRecord, decode
from trainer.data import RecordError, is_stale

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One stream entry: its id and the `rec` field (None when the entry has no such field or was deleted)."""

    entry_id: str
    data: bytes | None


def _entries(raw: list) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append(Entry(eid, (fields or {}).get(redis_keys.RECORD_FIELD)))
    return out


class StreamConsumer:
    """This trainer's view of the experience stream in group `trainers`."""

    def __init__(
        self, client: redis.Redis, run: str, consumer: str, task: str = "", down_timeout_s: float = 300.0
    ) -> None:
        self.client = client
        self.run = run
        self.consumer = consumer
        self.task = task
        self.stream = redis_keys.experience_stream(run, task)
        self.dead_stream = redis_keys.dead_letter_stream(run)
        self.down_timeout_s = down_timeout_s
        self._held: set[str] = set()  # delivered to this process and not yet acked
        self._reconnected = False
        self._call(lambda: redis_keys.ensure_group(client, run, task))

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a command, retrying connection errors with backoff until Redis is back (or the timeout)."""
        return redis_keys.call_with_backoff(
            fn, timeout_s=self.down_timeout_s, max_delay_s=2.0, on_reconnect=self._on_reconnect
        )

    def _on_reconnect(self) -> None:
        self._reconnected = True

    def _xreadgroup(self, last: str, count: int, block_ms: int | None) -> list[Entry]:
        def go() -> Any:  # redis-py types the reply loosely; _entries() reads it
            try:
                return self.client.xreadgroup(
                    redis_keys.CONSUMER_GROUP, self.consumer, {self.stream: last}, count=count, block=block_ms
                )
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # Redis came back without the group (no persistence): whatever it held is gone; say so.
                log.error("consumer group missing after a Redis restart (was Redis persistent?): recreating")
                redis_keys.ensure_group(self.client, self.run, self.task)
                return []

        resp = self._call(go)
        return _entries(resp[0][1]) if resp else []

    def read(self, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries never delivered to the group, waiting up to `block_ms` for the first."""
        entries = self._xreadgroup(">", count, block_ms or None)
        if self._reconnected:
            self._reconnected = False
            entries = self._pending_entries() + entries  # deliveries whose reply the restart lost
        fresh = []
        for e in entries:  # a new entry is also in the pending list just read back: keep it once
            if e.entry_id not in self._held:
                self._held.add(e.entry_id)
                fresh.append(e)
        return fresh

    def pending(self, page: int = 256) -> list[Entry]:
        """Every entry delivered to this consumer and not yet acked, in stream order."""
        out = self._pending_entries(page)
        self._held.update(e.entry_id for e in out)
        return out

    def _pending_entries(self, page: int = 256) -> list[Entry]:
        out: list[Entry] = []
        last = "0"
        while True:
            batch = self._xreadgroup(last, page, None)
            if not batch:
                return out
            out.extend(batch)
            last = batch[-1].entry_id

    def claim_orphans(self, min_idle_ms: int, page: int = 256) -> list[Entry]:
        """XAUTOCLAIM entries pending in the group for >= min_idle_ms under any consumer name."""
        out: list[Entry] = []
        start = "0-0"
        while True:
            resp = self._call(
                functools.partial(
                    self.client.xautoclaim,
                    self.stream,
                    redis_keys.CONSUMER_GROUP,
                    self.consumer,
                    min_idle_ms,
                    start_id=start,
                    count=page,
                )
            )
            nxt, claimed = resp[0], resp[1]
            out.extend(_entries(claimed))
            self._held.update(e.entry_id for e in _entries(claimed))
            start = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
            if start == "0-0":
                return out

    def ack_delete(self, entry_ids: list[str]) -> None:
        """XACK + XDEL in one transaction."""
        if not entry_ids:
            return

        def go() -> None:  # idempotent: safe to repeat after a lost reply
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.stream, redis_keys.CONSUMER_GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()

        self._call(go)
        self._held.difference_update(entry_ids)

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """Copy the entry with its reason to `opd:<run>:dead`, then ack + delete it (one transaction)."""
        log.warning("dead-lettering entry %s: %s", entry.entry_id, reason)
        fields: dict[FieldT, EncodableT] = {
            "stream": self.stream,
            "entry_id": entry.entry_id,
            "reason": reason,
            "consumer": self.consumer,
            "time": repr(time.time()),
        }
        if entry.data is not None:
            fields["rec"] = entry.data

        def go() -> None:  # a repeat after a lost reply can copy the entry twice to the dead stream only
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.dead_stream, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(self.stream, redis_keys.CONSUMER_GROUP, entry.entry_id)
            pipe.xdel(self.stream, entry.entry_id)
            pipe.execute()

        self._call(go)
        self._held.discard(entry.entry_id)

    def backlog(self) -> int:
        """Entries in the stream (delivered-but-unacked ones included): what the workers' max_backlog sees."""
        return int(self._call(lambda: self.client.xlen(self.stream)))


@dataclass
class BatchRead:
    """What `ExperienceReader.next_batch` consumed for one batch."""

    records: list[tuple[Entry, ExperienceRecord]] = field(default_factory=list)
    stale: list[tuple[Entry, str]] = field(default_factory=list)  # (entry, record id)
    dead: int = 0
    complete: bool = False  # False: stopped (idle timeout or stop request) before batch_size sequences
    # Incomplete because the stream went quiet while stale drops were held: commit them and read on. They
    # count in XLEN until acked, so holding them for a batch that cannot fill would stall the workers
    # (a stream full of stale entries blocks them, and without new entries the batch never fills).
    flush_stale: bool = False

    @property
    def num_sequences(self) -> int:
        return sum(len(rec.samples) for _, rec in self.records)


class ExperienceReader:
    """Assembles batches of whole records from the stream; recovered entries come first, in stream order."""

    def __init__(
        self,
        consumer: StreamConsumer,
        check: Callable[[ExperienceRecord], None],
        *,
        batch_size: int,
        max_policy_lag: int,
        read_block_ms: int = 1000,
        idle_timeout_s: float = 0.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.consumer = consumer
        self.check = check
        self.batch_size = batch_size
        self.max_policy_lag = max_policy_lag
        self.read_block_ms = read_block_ms
        self.idle_timeout_s = idle_timeout_s
        self.should_stop = should_stop
        self._queue: deque[Entry] = deque()
        self.dead_total = 0

    def requeue(self, entries: list[Entry]) -> None:
        """Entries to consider before any new one (recovered pending entries, or a partial batch)."""
        self._queue.extendleft(reversed(entries))

    def _classify(self, entry: Entry, current_version: int, out: BatchRead) -> None:
        if entry.data is None:
            self.consumer.dead_letter(entry, "entry has no 'rec' field (or was deleted)")
            out.dead += 1
            return
        try:
            rec = decode(entry.data)
            self.check(rec)
        except (ExperienceDecodeError, RecordError, ValueError, TypeError) as e:
            # Whatever a malformed record raises, it goes to the dead-letter stream: crashing here would
            # crash again on every restart, since the entry stays pending for this consumer.
            self.consumer.dead_letter(entry, f"{type(e).__name__}: {e}")
            out.dead += 1
            return
        if is_stale(rec.policy_version, current_version, self.max_policy_lag):
            out.stale.append((entry, rec.record_id))
        else:
            out.records.append((entry, rec))

    def next_batch(self, current_version: int) -> BatchRead:
        """Read until the batch holds >= batch_size sequences (complete), or until idle/stop (incomplete).

        An incomplete batch's usable records are requeued (they stay pending in Redis); its stale entries
        are returned so that the caller can commit them.
        """
        out = BatchRead()
        last_arrival = time.monotonic()
        while out.num_sequences < self.batch_size and not self.should_stop():
            if self._queue:
                self._classify(self._queue.popleft(), current_version, out)
                continue
            # Records are whole prompts of G samples: ask for about as many as still fit (one while G is
            # unknown), so that little is read ahead of the batch.
            want = 1
            if out.records:
                per_record = max(1, out.num_sequences // len(out.records))
                want = max(1, -(-(self.batch_size - out.num_sequences) // per_record))
            entries = self.consumer.read(want, self.read_block_ms)
            if entries:
                last_arrival = time.monotonic()
                self._queue.extend(entries)
            elif out.stale:
                out.flush_stale = True
                break
            elif self.idle_timeout_s and time.monotonic() - last_arrival >= self.idle_timeout_s:
                break
        self.dead_total += out.dead
        if out.num_sequences >= self.batch_size:
            out.complete = True
        else:
            self.requeue([e for e, _ in out.records])
            out.records = []
        return out
