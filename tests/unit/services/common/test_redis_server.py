"""EmbeddedRedis: a real redis-server starts, serves, stops without leftovers, and persists with AOF."""

import os
import socket

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.redis_server import EmbeddedRedis, free_port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_starts_serves_stops():
    server = EmbeddedRedis()
    with server:
        pid, port, data_dir = server.proc.pid, server.port, server.data_dir
        assert server.url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(server.url)
        client.set("k", b"v")
        assert client.get("k") == b"v"
        client.xadd("s", {"rec": b"\x00\x01"})
        assert client.xlen("s") == 1
        client.close()
        assert data_dir.is_dir()
    assert server.proc is None
    assert not process_exists(pid)  # stopped and reaped
    assert not port_open(port)
    assert not data_dir.exists()  # its temporary directory is removed


def test_password_required():
    with EmbeddedRedis(password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        # No client-side retries: redis-py would otherwise back off ~4 s before reporting the auth error.
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("k")
        anonymous.close()
        wrong = redis.Redis(host="127.0.0.1", port=server.port, password="nope", retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        wrong.close()
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()


def test_aof_restart_keeps_data(tmp_path):
    port = free_port()
    with EmbeddedRedis(port=port, data_dir=tmp_path, appendonly=True) as first:
        client = redis.Redis.from_url(first.url)
        ids = [client.xadd("opd:r:experience", {"rec": bytes([i]) * 100}) for i in range(5)]
        client.set("opd:r:policy_version", 3)
        client.close()
    assert any(tmp_path.rglob("*.aof"))  # the user-given directory is kept, with the append-only file
    with EmbeddedRedis(port=port, data_dir=tmp_path, appendonly=True) as second:
        client = redis.Redis.from_url(second.url)
        entries = client.xrange("opd:r:experience")
        assert [e[0] for e in entries] == ids
        assert [e[1][b"rec"] for e in entries] == [bytes([i]) * 100 for i in range(5)]
        assert client.get("opd:r:policy_version") == b"3"
        client.close()


def test_without_aof_restart_is_empty(tmp_path):
    port = free_port()
    with EmbeddedRedis(port=port, data_dir=tmp_path) as first:
        client = redis.Redis.from_url(first.url)
        client.set("k", 1)
        client.close()
    with EmbeddedRedis(port=port, data_dir=tmp_path) as second:
        client = redis.Redis.from_url(second.url)
        assert client.get("k") is None  # the AOF test above is not passing by accident
        client.close()
