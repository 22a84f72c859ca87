"""trainer.consumer against a real redis-server: own pending entries, orphan claiming, dead letters,
ack + delete, and batch assembly (whole records, stale drops, incomplete batches kept pending)."""

from __future__ import annotations

import numpy as np
import pytest

from services.common import redis_keys
from services.common.experience import ExperienceRecord, SampleRecord, decode, encode
from services.common.redis_server import EmbeddedRedis
from trainer.consumer import ExperienceReader, StreamConsumer
from trainer.data import RecordError

pytestmark = pytest.mark.integration


def _record(i: int, version: int, group: int = 2) -> ExperienceRecord:
    L, K = 3, 2
    s = SampleRecord(
        completion_ids=np.arange(L, dtype=np.int32),
        behaviour_logprobs=np.full(L, -1.0, np.float32),
        teacher_topk_ids=np.zeros((L, K), np.int32),
        teacher_topk_logprobs=np.full((L, K), -1.0, np.float32),
        teacher_target_logprobs=np.full(L, -1.0, np.float32),
    )
    return ExperienceRecord(f"r{i}", version, np.array([1, 2], np.int32), [s] * group)


@pytest.fixture
def redis_client():
    with EmbeddedRedis() as server:
        client = redis_keys.connect(server.url)
        yield client
        client.close()


def _add(client, run, payloads):
    stream = redis_keys.experience_stream(run)
    return [client.xadd(stream, {redis_keys.RECORD_FIELD: p}).decode() for p in payloads]


def test_pending_claim_ack_and_dead_letter(redis_client):
    c = StreamConsumer(redis_client, "t", "trainer-0")
    ids = _add(redis_client, "t", [encode(_record(i, 0)) for i in range(4)])
    assert [e.entry_id for e in c.read(3, 100)] == ids[:3]
    assert [e.entry_id for e in c.pending()] == ids[:3]
    assert decode(c.pending()[1].data).record_id == "r1"
    c.ack_delete(ids[:1])
    assert [e.entry_id for e in c.pending()] == ids[1:3] and c.backlog() == 3

    # another name after a crash: takes over the entries idle long enough, not younger ones
    other = StreamConsumer(redis_client, "t", "trainer-renamed")
    assert other.claim_orphans(min_idle_ms=60_000) == []
    assert [e.entry_id for e in other.claim_orphans(min_idle_ms=0)] == ids[1:3]
    assert c.pending() == [] and [e.entry_id for e in other.pending()] == ids[1:3]

    entry = other.pending()[0]
    other.dead_letter(entry, "RecordError: too few ids")
    dead = redis_client.xrange(redis_keys.dead_letter_stream("t"))
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"entry_id"].decode() == ids[1] and fields[b"reason"] == b"RecordError: too few ids"
    assert fields[b"rec"] == entry.data and fields[b"consumer"] == b"trainer-renamed"
    assert [e.entry_id for e in other.pending()] == [ids[2]] and redis_client.xlen(c.stream) == 2


def test_reader_assembles_whole_records_and_drops_stale(redis_client):
    c = StreamConsumer(redis_client, "r", "trainer-0")

    def check(rec):
        if rec.record_id == "r5":
            raise RecordError("bad on purpose")

    # versions: r0 1, r1 0 (stale at 2 with lag 1? 0 < 2 - 1: yes), r2 2, r3 2 (3 samples), r4 2, r5 2 (bad)
    recs = [_record(0, 1), _record(1, 0), _record(2, 2), _record(3, 2, group=3), _record(4, 2), _record(5, 2)]
    ids = _add(redis_client, "r", [encode(r) for r in recs] + [b"not a record"])
    reader = ExperienceReader(c, check, batch_size=4, max_policy_lag=1, read_block_ms=50, idle_timeout_s=0.3)
    first = reader.next_batch(current_version=2)
    assert first.complete and [r.record_id for _, r in first.records] == ["r0", "r2"]
    assert [rid for _, rid in first.stale] == ["r1"] and first.num_sequences == 4
    second = reader.next_batch(current_version=2)  # r3 (3) + r4 (2) = 5 >= 4: records stay whole
    assert second.complete and [r.record_id for _, r in second.records] == ["r3", "r4"]
    assert second.num_sequences == 5
    third = reader.next_batch(current_version=2)  # r5 and the garbage are dead letters; then idle
    assert not third.complete and third.records == [] and third.dead == 2 and reader.dead_total == 2
    assert redis_client.xlen(redis_keys.dead_letter_stream("r")) == 2
    # nothing is acked by the reader: the batches' entries wait for their checkpoint
    assert [e.entry_id for e in c.pending()] == ids[:5]

    # an incomplete batch keeps its records pending and queued for the next call
    more = _add(redis_client, "r", [encode(_record(6, 2))])
    fourth = reader.next_batch(current_version=2)
    assert not fourth.complete and fourth.records == []
    _add(redis_client, "r", [encode(_record(7, 2))])
    fifth = reader.next_batch(current_version=2)
    assert fifth.complete and [e.entry_id for e, _ in fifth.records][0] == more[0]
