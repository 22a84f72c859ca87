"""Dynamic batching: concurrent requests share forwards under a token budget.

Each request is split into its sequences (the unit of work). One worker thread loops: when idle it waits
for the first sequence, gathers for `window_s` from that sequence's arrival (or until the budget is full),
takes sequences first-in first-out while the batch's cost stays within `max_batch_tokens`, runs the scorer,
and hands each result back to the request it came from. A request larger than the budget simply spans
several forwards. Work that arrives while a forward runs has already waited, so the next forward starts at
once: the window only delays the first request after an idle period.

Backpressure: at most `max_queue` requests are admitted and unanswered; `submit` raises QueueFull beyond
that, and Draining once `begin_drain` was called.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import cast

from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import ScoreItem, ScoreResult

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds max_queue requests (maps to RESOURCE_EXHAUSTED)."""


class Draining(Exception):
    """The batcher no longer accepts work (maps to UNAVAILABLE)."""


@dataclass(eq=False)
class Ticket:
    """One admitted request: `future` resolves to its results in request order."""

    items: list[ScoreItem]
    future: Future[list[ScoreResult]] = field(default_factory=Future)
    results: list[ScoreResult | None] = field(default_factory=list)
    remaining: int = 0  # sequences not yet scored (or dropped)
    enqueued_at: float = 0.0
    cancelled: bool = False


@dataclass(eq=False)
class _Unit:
    ticket: Ticket
    index: int

    @property
    def tokens(self) -> int:
        return len(self.ticket.items[self.index].token_ids)


class Batcher:
    def __init__(
        self,
        score_fn: Callable[[list[ScoreItem]], list[ScoreResult]],
        max_batch_tokens: int,
        window_s: float,
        max_queue: int,
        pads_batches: bool = True,
        metrics: TeacherMetrics | None = None,
    ):
        self.score_fn = score_fn
        self.max_batch_tokens = max_batch_tokens
        self.window_s = window_s
        self.max_queue = max_queue
        self.pads_batches = pads_batches
        self.metrics = metrics
        self._cond = threading.Condition()
        self._units: deque[_Unit] = deque()
        self._queued_tokens = 0
        self._admitted = 0  # requests admitted and not yet finished
        self._draining = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="teacher-batcher", daemon=True)
        self._thread.start()

    # -- callers (gRPC threads) --------------------------------------------------------------------------

    def submit(self, items: Sequence[ScoreItem]) -> Ticket:
        ticket = Ticket(
            items=list(items), results=[None] * len(items), remaining=len(items), enqueued_at=time.monotonic()
        )
        with self._cond:
            if self._draining:
                raise Draining("server is draining; retry on another replica")
            if self._admitted >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} requests in flight); back off and retry")
            self._admitted += 1
            for i in range(len(items)):
                unit = _Unit(ticket, i)
                self._units.append(unit)
                self._queued_tokens += unit.tokens
            self._set_depth()
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request's queued sequences (its caller went away); no-op once it finished."""
        with self._cond:
            if ticket.future.done() or ticket.cancelled:
                return
            ticket.cancelled = True
            kept: deque[_Unit] = deque()
            for unit in self._units:
                if unit.ticket is ticket:
                    self._queued_tokens -= unit.tokens
                    ticket.remaining -= 1
                else:
                    kept.append(unit)
            self._units = kept
            if ticket.remaining == 0:
                self._finish(ticket, None)

    def begin_drain(self) -> None:
        """Refuse new work; queued and running work still completes."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no admitted request is unanswered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._admitted:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after it drained the queue."""
        with self._cond:
            self._draining = True
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        with self._cond:
            return self._admitted

    # -- worker thread -----------------------------------------------------------------------------------

    def _cost(self, count: int, longest: int, total: int) -> int:
        return count * longest if self.pads_batches else total

    def _take_batch(self) -> list[_Unit]:
        """Pop units first-in first-out while the batch stays within the token budget (lock held)."""
        batch: list[_Unit] = []
        longest = total = 0
        while self._units:
            n = self._units[0].tokens
            cost = self._cost(len(batch) + 1, max(longest, n), total + n)
            if batch and cost > self.max_batch_tokens:
                break
            unit = self._units.popleft()
            self._queued_tokens -= n
            batch.append(unit)
            longest, total = max(longest, n), total + n
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._units and not self._stopped:
                    self._cond.wait()
                if not self._units:
                    return
                deadline = self._units[0].ticket.enqueued_at + self.window_s
                while self._queued_tokens < self.max_batch_tokens and not self._draining:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._units:
                        break
                    self._cond.wait(left)
                batch = self._take_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Unit]) -> None:
        items = [u.ticket.items[u.index] for u in batch]
        t0 = time.perf_counter()
        results: list[ScoreResult] = []
        error: Exception | None = None
        try:
            results = self.score_fn(items)
        except Exception as e:  # a scorer failure fails the requests in this batch, not the server
            log.exception("scorer failed on a batch of %d sequences", len(items))
            error = e
        if self.metrics is not None:
            self.metrics.observe_batch(items, time.perf_counter() - t0, None if error else results)
        with self._cond:
            for j, unit in enumerate(batch):
                ticket = unit.ticket
                if ticket.future.done():
                    continue
                if error is not None:
                    self._drop_ticket(ticket)
                    self._finish(ticket, error)
                    continue
                ticket.results[unit.index] = results[j]
                ticket.remaining -= 1
                if ticket.remaining == 0:
                    self._finish(ticket, None)

    def _drop_ticket(self, ticket: Ticket) -> None:
        """Remove the ticket's other queued sequences (lock held)."""
        kept: deque[_Unit] = deque()
        for unit in self._units:
            if unit.ticket is ticket:
                self._queued_tokens -= unit.tokens
            else:
                kept.append(unit)
        self._units = kept

    def _finish(self, ticket: Ticket, error: BaseException | None) -> None:
        """Resolve the ticket's future and release its queue slot (lock held)."""
        if ticket.cancelled:
            ticket.future.cancel()
        elif error is not None:
            ticket.future.set_exception(error)
        else:
            # No error and nothing cancelled: remaining reached 0 because every slot was filled.
            ticket.future.set_result(cast(list[ScoreResult], ticket.results))
        self._admitted -= 1
        self._set_depth()
        self._cond.notify_all()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._admitted)
