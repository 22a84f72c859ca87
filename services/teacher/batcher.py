"""Dynamic batching: concurrent requests share forwards under a token budget, fairly across clients.

Each request is split into its sequences (the unit of work) and queued under its client (the name its
bearer token maps to; "anonymous" without auth). One worker thread loops: when idle it waits for the first
sequence, gathers for `window_s` from the oldest queued sequence's arrival (or until the budget is full),
fills a batch while its cost stays within `max_batch_tokens`, runs the scorer, and hands each result back
to the request it came from. A request larger than the budget simply spans several forwards. Work that
arrives while a forward runs has already waited, so the next forward starts at once: the window only
delays the first request after an idle period.

Fairness (token-based fair queuing): each client with queued work has a count of the tokens it was
served; every slot of a batch goes to the head sequence of the client with the smallest count (ties: the
older sequence), and a client that becomes active starts at the smallest count among the active ones, so
idle time banks no credit. While two clients are both queued their counts stay within one sequence of each
other: a client with one request waiting is served in the forward being filled, or in the next one if its
sequence no longer fits, however deep another client's queue is. Within a client, sequences run in
arrival order. With a single client this is first-in first-out, as before.

Backpressure: at most `max_queue` requests are admitted and unanswered in all, and at most
`max_client_inflight` (or the client's own `max_inflight`) per client; `submit` raises ClientLimit or
QueueFull beyond that, and Draining once `begin_drain` was called.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import cast

from services.teacher.auth import ANONYMOUS
from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import ScoreItem, ScoreResult

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds max_queue requests (maps to RESOURCE_EXHAUSTED)."""


class ClientLimit(QueueFull):
    """The client has its in-flight limit of requests admitted (maps to RESOURCE_EXHAUSTED)."""


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
    client: str = ANONYMOUS


@dataclass(eq=False)
class _Unit:
    ticket: Ticket
    index: int
    arrival: int  # global arrival order: the tie-break between clients

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
        max_client_inflight: int = 0,
    ):
        self.score_fn = score_fn
        self.max_batch_tokens = max_batch_tokens
        self.window_s = window_s
        self.max_queue = max_queue
        self.max_client_inflight = max_client_inflight or max_queue  # 0: only the global limit
        self.pads_batches = pads_batches
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Unit]] = {}  # per client, only clients with queued sequences
        self._served: dict[str, int] = {}  # tokens served per active client (the fairness count)
        self._arrivals = itertools.count()
        self._queued_tokens = 0
        self._admitted = 0  # requests admitted and not yet finished
        self._admitted_by: dict[str, int] = {}  # the same per client (clients with none are absent)
        self._draining = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="teacher-batcher", daemon=True)
        self._thread.start()

    # -- callers (gRPC threads) --------------------------------------------------------------------------

    def submit(
        self, items: Sequence[ScoreItem], client: str = ANONYMOUS, max_inflight: int | None = None
    ) -> Ticket:
        """Admit a request of `client`; `max_inflight` overrides `max_client_inflight` for it."""
        if not items:
            raise ValueError("a request needs at least one sequence")
        ticket = Ticket(
            items=list(items),
            results=[None] * len(items),
            remaining=len(items),
            enqueued_at=time.monotonic(),
            client=client,
        )
        limit = max_inflight or self.max_client_inflight
        with self._cond:
            if self._draining:
                raise Draining("server is draining; retry on another replica")
            held = self._admitted_by.get(client, 0)
            if held >= limit and limit < self.max_queue:  # a limit of max_queue or more is the queue's
                raise ClientLimit(
                    f"client {client!r} has {held} requests in flight, its limit (max_client_inflight or the "
                    f"tokens file's max_inflight) is {limit}; back off and retry"
                )
            if self._admitted >= self.max_queue:
                raise QueueFull(
                    f"queue full ({self.max_queue} requests in flight, max_queue); back off and retry"
                )
            self._admitted += 1
            self._admitted_by[client] = held + 1
            queue = self._queues.get(client)
            if queue is None:
                # A joining client starts level with the least-served active one: idle time banks no credit.
                floor = min((self._served[c] for c in self._queues), default=0)
                self._served[client] = max(self._served.get(client, 0), floor)
                queue = self._queues[client] = deque()
            for i in range(len(items)):
                unit = _Unit(ticket, i, next(self._arrivals))
                queue.append(unit)
                self._queued_tokens += unit.tokens
            self._set_depth(client)
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request's queued sequences (its caller went away); no-op once it finished."""
        with self._cond:
            if ticket.future.done() or ticket.cancelled:
                return
            ticket.cancelled = True
            ticket.remaining -= self._drop_units(ticket)
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

    def client_depth(self, client: str) -> int:
        """Requests of `client` admitted and not yet answered."""
        with self._cond:
            return self._admitted_by.get(client, 0)

    # -- worker thread -----------------------------------------------------------------------------------

    def _cost(self, count: int, longest: int, total: int) -> int:
        return count * longest if self.pads_batches else total

    def _next_client(self, skip: set[str]) -> str | None:
        """The active client with the fewest tokens served (ties: the older head sequence) (lock held)."""
        best: str | None = None
        best_key = (0, 0)
        for name, queue in self._queues.items():
            if name in skip:
                continue
            key = (self._served[name], queue[0].arrival)
            if best is None or key < best_key:
                best, best_key = name, key
        return best

    def _take_batch(self) -> list[_Unit]:
        """Fill a batch within the token budget, one head sequence at a time, fairly (lock held)."""
        batch: list[_Unit] = []
        longest = total = 0
        full: set[str] = set()  # clients whose head sequence no longer fits this batch
        while (name := self._next_client(full)) is not None:
            queue = self._queues[name]
            n = queue[0].tokens
            if batch and self._cost(len(batch) + 1, max(longest, n), total + n) > self.max_batch_tokens:
                full.add(name)
                continue
            batch.append(queue.popleft())
            self._served[name] += n
            self._queued_tokens -= n
            longest, total = max(longest, n), total + n
            if not queue:
                self._deactivate(name)
        return batch

    def _deactivate(self, name: str) -> None:
        """`name` has no queued sequence left (lock held)."""
        del self._queues[name]
        if not self._queues:
            self._served.clear()  # nobody waits: every count starts again from 0
        # Otherwise its count stays: a client that returns at once gets no second turn.

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queues and not self._stopped:
                    self._cond.wait()
                if not self._queues:
                    return
                deadline = min(q[0].ticket.enqueued_at for q in self._queues.values()) + self.window_s
                while self._queued_tokens < self.max_batch_tokens and not self._draining:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._queues:
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
            if error is None:
                self.metrics.observe_client_batch([u.ticket.client for u in batch], items)
        with self._cond:
            for j, unit in enumerate(batch):
                ticket = unit.ticket
                if ticket.future.done():
                    continue
                if error is not None:
                    self._drop_units(ticket)
                    self._finish(ticket, error)
                    continue
                ticket.results[unit.index] = results[j]
                ticket.remaining -= 1
                if ticket.remaining == 0:
                    self._finish(ticket, None)

    def _drop_units(self, ticket: Ticket) -> int:
        """Remove the ticket's queued sequences; returns how many (lock held)."""
        queue = self._queues.get(ticket.client)
        if queue is None:
            return 0
        kept = deque(u for u in queue if u.ticket is not ticket)
        dropped = len(queue) - len(kept)
        self._queued_tokens -= sum(u.tokens for u in queue if u.ticket is ticket)
        if kept:
            self._queues[ticket.client] = kept
        else:
            self._deactivate(ticket.client)
        return dropped

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
        held = self._admitted_by[ticket.client] - 1
        if held:
            self._admitted_by[ticket.client] = held
        else:
            del self._admitted_by[ticket.client]
        self._set_depth(ticket.client)
        self._cond.notify_all()

    def _set_depth(self, client: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._admitted)
            self.metrics.client_queue_depth.labels(client=client).set(self._admitted_by.get(client, 0))
