"""Redis `requirepass` end to end against a real redis-server: who gets in, where the password comes from,
and that it never shows in argv, URLs printed for people, or logs."""

import logging

import pytest
import redis

from launcher.pipeline import start_embedded_redis
from services.common.redis_keys import (
    REDIS_PASSWORD_ENV,
    REDIS_PASSWORD_FILE_ENV,
    connect,
    redacted,
    redis_password,
)
from services.common.redis_server import EmbeddedRedis

PASSWORD = "s3cret-" + "p" * 24


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis(password=PASSWORD) as s:
        yield s


def refused(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.AuthenticationError:
        return True
    except redis.ResponseError as e:  # NOAUTH on servers that answer before HELLO
        return "NOAUTH" in str(e) or "WRONGPASS" in str(e)
    return False


def test_unauthenticated_and_wrong_password_clients_are_refused(server):
    assert refused(connect(server.address_url, environ={}))
    assert refused(connect(server.address_url, environ={REDIS_PASSWORD_ENV: "wrong"}))
    assert refused(connect(server.url.replace(PASSWORD, "wrong"), environ={}))
    # the right password, from the URL or from the environment
    assert connect(server.url, environ={}).ping()
    assert connect(server.address_url, environ={REDIS_PASSWORD_ENV: PASSWORD}).ping()


def test_password_from_a_secret_file(server, tmp_path):
    path = tmp_path / "redis_password"
    path.write_text(PASSWORD + "\n")  # secret files end with a newline
    env = {REDIS_PASSWORD_FILE_ENV: str(path)}
    assert redis_password(env) == PASSWORD
    assert connect(server.address_url, environ=env).ping()
    # the variable wins over the file; a URL's own password wins over both
    assert redis_password({**env, REDIS_PASSWORD_ENV: "other"}) == "other"
    assert refused(connect(server.url.replace(PASSWORD, "wrong"), environ=env))
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        redis_password(env)
    assert redis_password({}) is None


def test_redacted_hides_only_the_password():
    assert redacted("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


def test_opd_up_redis_has_a_fresh_password_outside_argv(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    first, env = start_embedded_redis(tmp_path / "a")
    second, env2 = start_embedded_redis(tmp_path / "b")
    try:
        password = env[REDIS_PASSWORD_ENV]
        assert len(password) >= 32 and password != env2[REDIS_PASSWORD_ENV]
        assert password not in first.address_url
        assert password.encode() not in open(f"/proc/{first.proc.pid}/cmdline", "rb").read()
        assert refused(connect(first.address_url, environ={}))
        assert connect(first.address_url, environ=env).ping()
        assert refused(connect(second.address_url, environ=env))
    finally:
        first.close()
        second.close()
    assert password not in caplog.text
