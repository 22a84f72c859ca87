"""Dynamic batcher: packing under the token budget, gathering, splitting, backpressure, drain, cancel.

The scorer here is a plain function whose answer is derived from each item (so a result delivered to the
wrong request is caught) and which records the batches it was given.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from services.teacher.batcher import Batcher, Draining, QueueFull
from services.teacher.metrics import TeacherMetrics
from services.teacher.scorer import ScoreItem, ScoreResult


class RecordingScorer:
    """Answers topk_ids = token ids of the scored rows, so every result identifies its item."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []  # sequence lengths per forward
        self.delay_s = delay_s
        self.gate = gate
        self.fail_next = False

    def __call__(self, items: list[ScoreItem]) -> list[ScoreResult]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append([len(it.token_ids) for it in items])
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
