"""Worker writes against a real redis-server: whole records, an exact backlog bound, stops, Redis restarts."""

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from services.common.experience import ExperienceRecord, SampleRecord, decode
from services.common.redis_keys import (
    CONSUMER_GROUP,
    RECORD_FIELD,
    RECORD_MARKER_TTL_S,
    connect,
    experience_stream,
    record_marker_key,
)
from services.common.redis_server import EmbeddedRedis, free_port
from services.worker.config import WorkerConfig
from services.worker.loop import RolloutWorker


def make_record(i: int, length: int = 5, k: int = 3) -> ExperienceRecord:
    rng = np.random.default_rng(i)
    sample = SampleRecord(
        completion_ids=rng.integers(0, 50, length).astype(np.int32),
        behaviour_logprobs=-rng.random(length).astype(np.float32),
        teacher_topk_ids=rng.integers(0, 50, (length, k)).astype(np.int32),
        teacher_topk_logprobs=-rng.random((length, k)).astype(np.float32),
        teacher_target_logprobs=-rng.random(length).astype(np.float32),
        teacher_model_id="t",
    )
    return ExperienceRecord(f"test-{i}", i, np.arange(1, 4, dtype=np.int32), [sample], task="unit")


def make_worker(url: str, **kw) -> RolloutWorker:
    cfg = WorkerConfig(run="unit", redis_url=url, prompts="unused.jsonl", **kw)
    # write() only talks to Redis; the service clients are not needed here.
    return RolloutWorker(cfg, None, None, connect(url))


@pytest.fixture
def server():
    with EmbeddedRedis() as s:
        yield s


def test_write_appends_one_whole_entry(server):
    worker = make_worker(server.url)
    rec = make_record(7)
    entry_id = worker.write(rec)
    entries = worker.redis.xrange(experience_stream("unit"))
    assert [e[0].decode() for e in entries] == [entry_id]
    assert list(entries[0][1]) == [RECORD_FIELD]
    got = decode(entries[0][1][RECORD_FIELD])
    assert (got.record_id, got.policy_version, got.task) == ("test-7", 7, "unit")
    np.testing.assert_array_equal(got.samples[0].teacher_topk_ids, rec.samples[0].teacher_topk_ids)
    np.testing.assert_array_equal(got.samples[0].behaviour_logprobs, rec.samples[0].behaviour_logprobs)
    assert worker.totals["records"] == 1 and worker.totals["tokens"] == 5


def test_backlog_bound_is_exact_with_concurrent_writers(server):
    """Six threads write 18 records into a stream bounded at 3 while a slow consumer drains it: the length
    never exceeds 3, and every record arrives exactly once."""
    bound, n = 3, 18
    worker = make_worker(server.url, max_backlog=bound)
    stream = experience_stream("unit")
    r = connect(server.url)
    lengths, consumed = [], []
    writers_done = threading.Event()

    def consume():
        while not (writers_done.is_set() and r.xlen(stream) == 0):
            lengths.append(r.xlen(stream))
            for entry_id, fields in r.xrange(stream, count=1):
                consumed.append(decode(fields[RECORD_FIELD]).record_id)
                r.xdel(stream, entry_id)
            time.sleep(0.01)

    consumer = threading.Thread(target=consume)
    consumer.start()
    writers = [
        threading.Thread(target=lambda j=j: [worker.write(make_record(i)) for i in range(j, n, 6)])
        for j in range(6)
    ]
    for t in writers:
        t.start()
    for t in writers:
        t.join(30)
    writers_done.set()
    consumer.join(30)
    assert max(lengths) == bound  # it was full at times ...
    assert all(x <= bound for x in lengths)  # ... and never over
    assert sorted(consumed) == sorted(f"test-{i}" for i in range(n))
    assert worker.totals["records"] == n


def test_full_stream_blocks_then_resumes(server):
    worker = make_worker(server.url, max_backlog=2)
    stream = experience_stream("unit")
    worker.write(make_record(0))
    worker.write(make_record(1))
    done = threading.Event()
    t = threading.Thread(target=lambda: (worker.write(make_record(2)), done.set()))
    t.start()
    assert not done.wait(1.0)  # blocked: the stream is full
    assert worker.redis.xlen(stream) == 2
    # A trainer consumes one entry (group read, ack, delete): the writer resumes.
    worker.redis.xgroup_create(stream, CONSUMER_GROUP, id="0")
    ((_, [(entry_id, _)]),) = worker.redis.xreadgroup(CONSUMER_GROUP, "c", {stream: ">"}, count=1)
    worker.redis.xack(stream, CONSUMER_GROUP, entry_id)
    worker.redis.xdel(stream, entry_id)
    assert done.wait(10)
    t.join()
    ids = [decode(f[RECORD_FIELD]).record_id for _, f in worker.redis.xrange(stream)]
    assert ids == ["test-1", "test-2"]


def test_stop_while_full_drops_the_record_whole(server):
    worker = make_worker(server.url, max_backlog=1)
    stream = experience_stream("unit")
    worker.write(make_record(0))
    result = []
    t = threading.Thread(target=lambda: result.append(worker.write(make_record(1))))
    t.start()
    time.sleep(0.5)
    worker.stop()
    t.join(10)
    assert result == [None]
    assert worker.redis.xlen(stream) == 1
    assert worker.totals["dropped"] == 1 and worker.totals["records"] == 1


def test_write_survives_a_redis_restart(tmp_path):
    """Redis goes away mid-run and comes back on the same port with its AOF: the pending write lands and
    the earlier entries are still there (the Lua script is reloaded into the fresh server's cache)."""
    port = free_port()
    redis_server = EmbeddedRedis(port=port, data_dir=tmp_path, appendonly=True).start()
    try:
        worker = make_worker(redis_server.url, max_backlog=10)
        first = worker.write(make_record(0))
        redis_server.stop()
        result = []
        t = threading.Thread(target=lambda: result.append(worker.write(make_record(1))))
        t.start()
        time.sleep(1.0)
        assert t.is_alive()  # retrying while Redis is down
        redis_server.start()
        t.join(30)
        assert not t.is_alive()
        entries = worker.redis.xrange(experience_stream("unit"))
        assert [e[0].decode() for e in entries] == [first, result[0]]
        assert [decode(e[1][RECORD_FIELD]).record_id for e in entries] == ["test-0", "test-1"]
    finally:
        redis_server.close()


def test_a_record_id_is_appended_once(server):
    """A second write of the same record (same record_id) appends nothing and returns the first entry id;
    a record with a fresh id is appended; a duplicate returns at once even while the stream is full."""
    worker = make_worker(server.url, max_backlog=2)
    stream = experience_stream("unit")
    first = worker.write(make_record(0))
    assert worker.write(make_record(0)) == first
    assert worker.redis.xlen(stream) == 1 and worker.totals["records"] == 1
    second = worker.write(make_record(1))
    assert second != first and worker.redis.xlen(stream) == 2
    # full now: a new record would wait, a duplicate must not
    t0 = time.monotonic()
    assert worker.write(make_record(1)) == second
    assert time.monotonic() - t0 < 5
    assert [decode(f[RECORD_FIELD]).record_id for _, f in worker.redis.xrange(stream)] == ["test-0", "test-1"]
    assert worker.totals["records"] == 2
    # the marker expires (bounded memory) and names the entry
    marker = record_marker_key("unit", "test-0")
    assert 0 < worker.redis.ttl(marker) <= RECORD_MARKER_TTL_S
    assert worker.redis.get(marker).decode().split(" ")[1] == first


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, when armed, forwards the next command but closes the client connection
    instead of forwarding Redis's reply: the command ran, the client sees a connection error."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, replies):
        try:
            while data := src.recv(65536):
                if replies and self.armed.is_set():
                    self.armed.clear()
                    self.dropped += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self):
        self.listener.close()


def test_a_lost_reply_does_not_duplicate_the_record(server):
    """Redis runs the append, the reply is lost, the client retries: still one entry, counted once."""
    proxy = ReplyDroppingProxy(server.port)
    try:
        worker = make_worker(f"redis://127.0.0.1:{proxy.port}/0")
        stream = experience_stream("unit")
        first = worker.write(make_record(0))  # loads the script, so the armed reply is the append's
        proxy.armed.set()
        second = worker.write(make_record(1))
        assert proxy.dropped == 1
        direct = connect(server.url)
        entries = direct.xrange(stream)
        assert [e[0].decode() for e in entries] == [first, second]
        assert [decode(e[1][RECORD_FIELD]).record_id for e in entries] == ["test-0", "test-1"]
        assert worker.totals["records"] == 2
    finally:
        proxy.close()
