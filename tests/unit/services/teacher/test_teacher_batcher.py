"""Dynamic batcher: packing under the token budget, gathering, splitting, backpressure, drain, cancel, and
fairness across clients (per-client queues, in-flight limits, per-client metrics).

The scorer here is a plain function whose answer is derived from each item (so a result delivered to the
wrong request is caught) and which records the batches it was given.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from services.teacher.batcher import Batcher, ClientLimit, Draining, QueueFull
from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import ScoreItem, ScoreResult


class RecordingScorer:
    """Answers topk_ids = token ids of the scored rows, so every result identifies its item."""

    def __init__(
        self,
        delay_s: float = 0.0,
        gate: threading.Event | None = None,
        steps: threading.Semaphore | None = None,
    ):
        self.batches: list[list[int]] = []  # sequence lengths per forward
        self.tags: list[list[int]] = []  # the `tag` of each item (its first id // 1000) per forward
        self.steps = steps  # when given, each forward waits for one release
        self.delay_s = delay_s
        self.gate = gate
        self.fail_next = False

    def __call__(self, items: list[ScoreItem]) -> list[ScoreResult]:
        self.batches.append([len(it.token_ids) for it in items])  # recorded first: a test may wait for it
        self.tags.append([int(it.token_ids[0]) // 1000 for it in items])
        if self.gate is not None:
            self.gate.wait(5)
        if self.steps is not None:
            assert self.steps.acquire(timeout=5), "test never released this forward"
        time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        out = []
        for it in items:
            rows = it.token_ids[it.score_from :]
            out.append(
                ScoreResult(
                    rows[:, None].astype(np.int32),
                    np.zeros((len(rows), 1), np.float32),
                    rows.astype(np.float32),
                    None,
                )
            )
        return out


def item(n: int, tag: int = 0, score_from: int = 1) -> ScoreItem:
    return ScoreItem(np.arange(tag * 1000, tag * 1000 + n, dtype=np.int32), score_from, 1)


def check(results: list[ScoreResult], items: list[ScoreItem]) -> None:
    assert len(results) == len(items)
    for r, it in zip(results, items, strict=True):
        np.testing.assert_array_equal(r.topk_ids[:, 0], it.token_ids[it.score_from :])


def test_single_request_round_trip():
    scorer = RecordingScorer()
    b = Batcher(scorer, max_batch_tokens=64, window_s=0.0, max_queue=4)
    items = [item(5, 1), item(9, 2, score_from=4), item(2, 3)]
    check(b.submit(items).future.result(5), items)
    assert scorer.batches == [[5, 9, 2]]
    b.close(5)


def test_padded_budget_splits_an_oversized_request_into_forwards():
    scorer = RecordingScorer()
    b = Batcher(scorer, max_batch_tokens=20, window_s=0.0, max_queue=4, pads_batches=True)
    items = [item(n, i) for i, n in enumerate([10, 10, 3, 7, 20, 1])]
    check(b.submit(items).future.result(5), items)
    # padded cost = count x longest <= 20, first in first out
    assert scorer.batches == [[10, 10], [3, 7], [20], [1]]
    for batch in scorer.batches:
        assert len(batch) * max(batch) <= 20
    b.close(5)


def test_unpadded_budget_counts_the_sum_of_lengths():
    scorer = RecordingScorer()
    b = Batcher(scorer, max_batch_tokens=20, window_s=0.0, max_queue=4, pads_batches=False)
    items = [item(n, i) for i, n in enumerate([10, 4, 6, 3, 17])]
    check(b.submit(items).future.result(5), items)
    assert scorer.batches == [[10, 4, 6], [3, 17]]
    b.close(5)


def test_window_merges_concurrent_requests_into_one_forward():
    scorer = RecordingScorer()
    b = Batcher(scorer, max_batch_tokens=1000, window_s=0.3, max_queue=16)
    tickets, items = [], []
    for i in range(8):
        it = [item(4 + i, i)]
        items.append(it)
        tickets.append(b.submit(it))
    for t, it in zip(tickets, items, strict=True):
        check(t.future.result(5), it)
    assert scorer.batches == [[4 + i for i in range(8)]]
    b.close(5)


def test_work_arriving_during_a_forward_is_batched_next_without_waiting_a_window():
    gate = threading.Event()
    scorer = RecordingScorer(gate=gate)
    b = Batcher(scorer, max_batch_tokens=1000, window_s=0.05, max_queue=16)
    first = b.submit([item(3, 0)])
    time.sleep(0.15)  # the first forward is now blocked on the gate
    later = [b.submit([item(5, i)]) for i in range(1, 5)]
    gate.set()
    first.future.result(5)
    for i, t in enumerate(later, start=1):
        check(t.future.result(5), [item(5, i)])
    assert scorer.batches == [[3], [5, 5, 5, 5]]
    b.close(5)


def test_concurrent_submitters_get_their_own_results():
    scorer = RecordingScorer(delay_s=0.002)
    b = Batcher(scorer, max_batch_tokens=64, window_s=0.002, max_queue=64)
    errors: list[BaseException] = []

    def client(tag: int) -> None:
        try:
            for j in range(10):
                items = [
                    item(2 + (tag + j + s) % 13, tag * 100 + j * 10 + s) for s in range(1 + (tag + j) % 3)
                ]
                check(b.submit(items).future.result(10), items)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert max(len(batch) for batch in scorer.batches) > 1  # batching really happened
    b.close(5)


def test_queue_full_then_accepts_again():
    gate = threading.Event()
    b = Batcher(RecordingScorer(gate=gate), max_batch_tokens=100, window_s=0.0, max_queue=2)
    t1, t2 = b.submit([item(3, 1)]), b.submit([item(3, 2)])
    with pytest.raises(QueueFull, match="queue full"):
        b.submit([item(3, 3)])
    gate.set()
    t1.future.result(5)
    t2.future.result(5)
    assert b.depth == 0
    check(b.submit([item(4, 4)]).future.result(5), [item(4, 4)])
    b.close(5)


def test_drain_finishes_queued_work_and_refuses_new():
    gate = threading.Event()
    b = Batcher(RecordingScorer(gate=gate), max_batch_tokens=4, window_s=0.0, max_queue=8)
    items = [item(4, i) for i in range(3)]  # three forwards
    ticket = b.submit(items)
    b.begin_drain()
    with pytest.raises(Draining):
        b.submit([item(2, 9)])
    assert not b.wait_idle(0.05)
    gate.set()
    assert b.wait_idle(5)
    check(ticket.future.result(0), items)
    b.close(5)


def test_scorer_failure_fails_that_request_only_and_the_batcher_goes_on():
    scorer = RecordingScorer()
    b = Batcher(scorer, max_batch_tokens=100, window_s=0.0, max_queue=8)
    scorer.fail_next = True
    with pytest.raises(RuntimeError, match="boom"):
        b.submit([item(3, 1)]).future.result(5)
    assert b.depth == 0
    check(b.submit([item(3, 2)]).future.result(5), [item(3, 2)])
    b.close(5)


def test_cancel_drops_queued_sequences_and_frees_the_slot():
    gate = threading.Event()
    scorer = RecordingScorer(gate=gate)
    b = Batcher(scorer, max_batch_tokens=4, window_s=0.0, max_queue=2)
    running = b.submit([item(4, 1)])
    time.sleep(0.1)  # its forward is blocked on the gate
    doomed = b.submit([item(4, 2), item(4, 3)])
    b.cancel(doomed)
    with pytest.raises(CancelledError):
        doomed.future.result(1)
    assert b.depth == 1
    gate.set()
    running.future.result(5)
    b.close(5)
    assert scorer.batches == [[4]]  # the cancelled sequences never ran


def test_metrics_follow_the_batches():
    metrics = TeacherMetrics()
    b = Batcher(RecordingScorer(), max_batch_tokens=100, window_s=0.0, max_queue=8, metrics=metrics)
    b.submit([item(5, 1, score_from=2), item(3, 2)]).future.result(5)
    b.close(5)
    value = metrics.registry.get_sample_value
    assert value("opd_teacher_scored_tokens_total") == 3 + 2
    assert value("opd_teacher_input_tokens_total") == 8
    assert value("opd_teacher_batch_sequences_count") == 1
    assert value("opd_teacher_queue_depth") == 0


# -- clients: fairness, limits, per-client metrics ---------------------------------------------------------

A, B = "pipeline", "outside"


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_a_flooding_client_does_not_starve_another():
    """A queues 30 requests, then B queues 3: B is served in every forward until it is done."""
    gate = threading.Event()
    scorer = RecordingScorer(gate=gate)
    b = Batcher(scorer, max_batch_tokens=8, window_s=0.0, max_queue=64)  # 2 sequences of 4 per forward
    flood = [b.submit([item(4, 0)], client=A)]
    wait_for(lambda: len(scorer.batches) == 1)  # A's first forward runs (blocked on the gate)
    flood += [b.submit([item(4, i)], client=A) for i in range(1, 30)]
    late = [b.submit([item(4, 100 + i)], client=B) for i in range(3)]
    gate.set()
    for i, t in enumerate(late):
        check(t.future.result(5), [item(4, 100 + i)])
    for i, t in enumerate(flood):
        check(t.future.result(5), [item(4, i)])
    b.close(5)
    # The forward that ran when B arrived held A's work; the next three carry one B sequence each.
    assert scorer.tags[:4] == [[0], [1, 100], [2, 101], [3, 102]]
    assert [t for batch in scorer.tags for t in batch if t < 100] == list(range(30))  # A in order


def test_fairness_counts_tokens_not_sequences():
    """A sends 16-token sequences, B 4-token ones: B gets about 4 sequences per A sequence."""
    gate = threading.Event()
    scorer = RecordingScorer(gate=gate)
    b = Batcher(scorer, max_batch_tokens=32, window_s=0.0, max_queue=64, pads_batches=False)
    first = b.submit([item(16, 0)], client=A)
    wait_for(lambda: len(scorer.batches) == 1)
    a_items = [item(16, i) for i in range(1, 9)]
    b_items = [item(4, 100 + i) for i in range(16)]
    ta = b.submit(a_items, client=A)
    tb = b.submit(b_items, client=B)
    gate.set()
    first.future.result(5)
    check(ta.future.result(5), a_items)
    check(tb.future.result(5), b_items)
    b.close(5)
    served = {A: 16, B: 0}
    for batch, lengths in zip(scorer.tags[1:], scorer.batches[1:], strict=True):
        assert sum(lengths) <= 32
        for tag, n in zip(batch, lengths, strict=True):
            served[B if tag >= 100 else A] += n
        # While both are queued their served tokens stay within one sequence (16) of each other.
        if served[B] < 16 * 4:
            assert abs(served[A] - served[B]) <= 16 + 4, (scorer.tags, served)
    # order within each client is kept
    flat = [t for batch in scorer.tags for t in batch]
    assert [t for t in flat if t < 100] == list(range(9))
    assert [t for t in flat if t >= 100] == list(range(100, 116))


def test_a_returning_client_gets_no_credit_for_its_idle_time():
    """One sequence per forward, each forward released by the test: B leaves, A goes on alone for two
    forwards, B returns with two sequences: they alternate with A's instead of running back to back."""
    steps = threading.Semaphore(0)
    scorer = RecordingScorer(steps=steps)
    b = Batcher(scorer, max_batch_tokens=4, window_s=0.0, max_queue=64)
    tickets = [b.submit([item(4, 0)], client=A)]
    wait_for(lambda: len(scorer.batches) == 1)
    tickets += [b.submit([item(4, i)], client=A) for i in range(1, 7)]
    tickets.append(b.submit([item(4, 100)], client=B))
    for n in (2, 3, 4, 5):
        steps.release()
        wait_for(lambda n=n: len(scorer.batches) == n)
    assert scorer.tags == [[0], [1], [100], [2], [3]]  # B served once, then idle while A ran twice
    tickets += [b.submit([item(4, 101)], client=B), b.submit([item(4, 102)], client=B)]
    for _ in range(6):  # forwards 5 (running) to 10
        steps.release()
    for t in tickets:
        t.future.result(5)
    b.close(5)
    assert scorer.tags[5:] == [[4], [101], [5], [102], [6]]


def test_a_sequence_too_big_for_the_rest_of_a_batch_leads_the_next_one():
    gate = threading.Event()
    scorer = RecordingScorer(gate=gate)
    b = Batcher(scorer, max_batch_tokens=20, window_s=0.0, max_queue=64, pads_batches=False)
    first = b.submit([item(2, 0)], client=A)
    wait_for(lambda: len(scorer.batches) == 1)
    ta = b.submit([item(6, i) for i in range(1, 8)], client=A)
    tb = b.submit([item(18, 100)], client=B)
    gate.set()
    for t in (first, ta, tb):
        t.future.result(5)
    b.close(5)
    # B's 18 tokens do not fit beside A's 6: A fills the forward, B leads the next one.
    assert scorer.tags[1:3] == [[1, 2, 3], [100]]


def test_per_client_in_flight_limit():
    gate = threading.Event()
    metrics = TeacherMetrics()
    b = Batcher(
        RecordingScorer(gate=gate),
        max_batch_tokens=100,
        window_s=0.0,
        max_queue=5,
        max_client_inflight=2,
        metrics=metrics,
    )
    held = [b.submit([item(3, 1)], client=A), b.submit([item(3, 2)], client=A)]
    with pytest.raises(ClientLimit, match=r"client 'pipeline' has 2 requests in flight.*limit .* is 2"):
        b.submit([item(3, 3)], client=A)
    assert isinstance(ClientLimit("x"), QueueFull)  # the same status code (RESOURCE_EXHAUSTED)
    # another client is admitted; its own override (max_inflight, from the tokens file) applies to it
    held.append(b.submit([item(3, 4)], client=B, max_inflight=1))
    with pytest.raises(ClientLimit, match="limit .* is 1"):
        b.submit([item(3, 5)], client=B, max_inflight=1)
    held += [b.submit([item(3, 6)], client="third"), b.submit([item(3, 7)], client="third")]
    with pytest.raises(QueueFull, match=r"queue full \(5 requests in flight, max_queue\)") as err:
        b.submit([item(3, 8)], client="fourth")  # the global limit stays
    assert not isinstance(err.value, ClientLimit)
    assert (b.client_depth(A), b.client_depth(B), b.depth) == (2, 1, 5)
    value = metrics.registry.get_sample_value
    assert value("opd_teacher_client_queue_depth", {"client": A}) == 2
    gate.set()
    for t in held:
        t.future.result(5)
    assert (b.client_depth(A), b.depth) == (0, 0)
    check(b.submit([item(3, 9)], client=A).future.result(5), [item(3, 9)])  # admitted again
    b.close(5)
    assert value("opd_teacher_client_queue_depth", {"client": A}) == 0
    assert value("opd_teacher_client_input_tokens_total", {"client": A}) == 3 * 3
    assert value("opd_teacher_client_input_tokens_total", {"client": "third"}) == 2 * 3
    assert value("opd_teacher_client_scored_tokens_total", {"client": B}) == 2


def test_a_per_client_limit_at_max_queue_reports_the_queue():
    b = Batcher(RecordingScorer(gate=threading.Event()), 100, 0.0, max_queue=1, max_client_inflight=1)
    b.submit([item(3, 1)], client=A)
    with pytest.raises(QueueFull, match="queue full") as err:
        b.submit([item(3, 2)], client=A)
    assert not isinstance(err.value, ClientLimit)
    b.close(0.1)


def test_cancel_drops_only_that_clients_sequences():
    gate = threading.Event()
    scorer = RecordingScorer(gate=gate)
    b = Batcher(scorer, max_batch_tokens=4, window_s=0.0, max_queue=8)
    running = b.submit([item(4, 0)], client=A)
    wait_for(lambda: len(scorer.batches) == 1)
    doomed = b.submit([item(4, 1), item(4, 2)], client=A)
    kept_a = b.submit([item(4, 3)], client=A)
    kept_b = b.submit([item(4, 100), item(4, 101)], client=B)
    b.cancel(doomed)
    assert b.client_depth(A) == 2 and b.client_depth(B) == 1
    gate.set()
    running.future.result(5)
    check(kept_a.future.result(5), [item(4, 3)])
    check(kept_b.future.result(5), [item(4, 100), item(4, 101)])
    b.close(5)
    assert sorted(t for batch in scorer.tags for t in batch) == [0, 3, 100, 101]


def test_empty_request_is_refused():
    b = Batcher(RecordingScorer(), 100, 0.0, max_queue=2)
    with pytest.raises(ValueError, match="at least one sequence"):
        b.submit([], client=A)
    assert b.depth == 0
    b.close(5)
