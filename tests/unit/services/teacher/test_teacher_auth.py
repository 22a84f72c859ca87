"""Teacher token table: the tokens file format, constant-time lookup, reload on change, and bad files that
keep the previous table (and never open the server or log a token)."""

from __future__ import annotations

import logging
import os

import pytest

from services.common.config import ConfigError, build_config
from services.teacher.auth import (
    DEFAULT_CLIENT,
    Client,
    TokensFileError,
    TokenTable,
    current_client,
    parse_tokens_file,
    run_as,
)
from services.teacher.config import TeacherConfig
from services.teacher.server import build_token_table

TOK_A = "alpha-" + "a" * 26
TOK_B = "bravo-" + "b" * 26
TOK_C = "charlie-" + "c" * 24
STATIC = "static-" + "s" * 25


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(path, text: str, mode: int = 0o600) -> None:
    """Atomic rewrite (temporary file + rename), as the docs ask."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_parse_format():
    text = f"""
    # clients of the teacher
    pipeline  {TOK_A}
    lab.trainer-2 {TOK_B}   max_inflight=8   # the outside trainer

    """
    assert parse_tokens_file(text, "f") == [
        (TOK_A, Client("pipeline")),
        (TOK_B, Client("lab.trainer-2", 8)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipeline\n", "f:1: expected `name token"),
        (f"-bad {TOK_A}\n", "f:1: client name '-bad'"),
        (f"{'n' * 65} {TOK_A}\n", "is not 1-64 characters"),
        ("pipeline short-token\n", "f:1: the token of 'pipeline' is shorter than 16"),
        (f"a {TOK_A}\n# x\na {TOK_B}\n", "f:3: client 'a' appears twice"),
        (f"a {TOK_A}\nb {TOK_A}\n", "f:2: the token of 'b' is also another client's token"),
        (f"a {TOK_A} {TOK_B}\n", "f:1: column 3 is no known option"),
        (f"a {TOK_A} max_inflight=0\n", "max_inflight must be an integer >= 1"),
        (f"a {TOK_A} max_inflight=x\n", "max_inflight must be an integer >= 1"),
        ("# nobody\n\n", "f: no clients"),
    ],
)
def test_parse_errors_name_the_line_and_never_the_token(text, message):
    with pytest.raises(TokensFileError, match=message) as err:
        parse_tokens_file(text, "f")
    for token in (TOK_A, TOK_B, "short-token"):
        assert token not in str(err.value)


def test_static_token_is_the_default_client():
    table = TokenTable(STATIC)
    assert table.enabled and table.clients() == [Client(DEFAULT_CLIENT)]
    assert table.authenticate(bearer(STATIC)) == Client(DEFAULT_CLIENT)
    for wrong in ("", STATIC, f"Basic {STATIC}", bearer(STATIC + "x"), bearer(STATIC[:-1]), "Bearer "):
        assert table.authenticate(wrong) is None
    assert not TokenTable().enabled


def test_tokens_file_with_static_token(tmp_path):
    path = tmp_path / "tokens"
    write(path, f"pipeline {TOK_A}\nlab {TOK_B} max_inflight=4\n")
    table = TokenTable(STATIC, str(path))
    assert table.authenticate(bearer(TOK_A)) == Client("pipeline")
    assert table.authenticate(bearer(TOK_B)) == Client("lab", 4)
    assert table.authenticate(bearer(STATIC)) == Client(DEFAULT_CLIENT)
    assert table.authenticate(bearer(TOK_C)) is None
    write(path, f"default {TOK_A}\n")
    with pytest.raises(TokensFileError, match="'default' is taken"):
        TokenTable(STATIC, str(path))
    write(path, f"other {STATIC}\n")
    with pytest.raises(TokensFileError, match="equals `token`"):
        TokenTable(STATIC, str(path))


def test_a_changed_file_takes_effect_after_the_check_interval(tmp_path, caplog):
    path = tmp_path / "tokens"
    write(path, f"pipeline {TOK_A}\nlab {TOK_B}\n")
    clock = Clock()
    table = TokenTable(tokens_file=str(path), check_interval_s=1.0, clock=clock)
    write(path, f"pipeline {TOK_A}\nnewcomer {TOK_C}\n")  # revoke lab, add newcomer
    clock.now = 0.5  # not yet checked again
    assert table.authenticate(bearer(TOK_B)) == Client("lab")
    assert table.authenticate(bearer(TOK_C)) is None
    clock.now = 1.0
    with caplog.at_level(logging.INFO, logger="services.teacher.auth"):
        assert table.authenticate(bearer(TOK_B)) is None
    assert table.authenticate(bearer(TOK_C)) == Client("newcomer")
    assert table.authenticate(bearer(TOK_A)) == Client("pipeline")
    assert "added ['newcomer'], removed ['lab']" in caplog.text
    assert table.reloads == 2
    clock.now = 5.0  # unchanged file: not read again
    table.authenticate(bearer(TOK_A))
    assert table.reloads == 2
    for token in (TOK_A, TOK_B, TOK_C):
        assert token not in caplog.text


def test_a_bad_file_keeps_the_previous_table_and_logs_once(tmp_path, caplog):
    path = tmp_path / "tokens"
    write(path, f"pipeline {TOK_A}\n")
    clock = Clock()
    table = TokenTable(tokens_file=str(path), clock=clock)
    bad_files = [
        f"pipeline {TOK_A}\nbroken-line\n",  # a half-written edit
        "",  # truncated
        f"pipeline {TOK_A}\nx {TOK_B} max_inflight={TOK_C}\n",
    ]
    with caplog.at_level(logging.ERROR, logger="services.teacher.auth"):
        for i, text in enumerate(bad_files):
            write(path, text)
            for _ in range(3):  # checked three times, logged once
                clock.now += 1.0
                assert table.authenticate(bearer(TOK_A)) == Client("pipeline")
                assert table.authenticate(bearer(TOK_B)) is None
            assert caplog.text.count("keeping the previous 1 clients") == i + 1
        path.unlink()
        clock.now += 1.0
        assert table.authenticate(bearer(TOK_A)) == Client("pipeline")
        assert "No such file" in caplog.text
        write(path, f"pipeline {TOK_A}\n", mode=0o602)  # world-writable: anyone could add a token
        clock.now += 1.0
        assert table.authenticate(bearer(TOK_A)) == Client("pipeline")
        assert "world-writable" in caplog.text
    for token in (TOK_A, TOK_B, TOK_C):
        assert token not in caplog.text
    write(path, f"fixed {TOK_B}\n")
    clock.now += 1.0
    assert table.authenticate(bearer(TOK_B)) == Client("fixed")
    assert table.authenticate(bearer(TOK_A)) is None


def test_reload_now_ignores_the_interval_sighup(tmp_path):
    path = tmp_path / "tokens"
    write(path, f"pipeline {TOK_A}\n")
    table = TokenTable(tokens_file=str(path), clock=Clock())
    write(path, f"lab {TOK_B}\n")
    assert table.reload() is True
    assert table.authenticate(bearer(TOK_B)) == Client("lab")
    assert table.authenticate(bearer(TOK_A)) is None
    write(path, "garbage\n")
    assert table.reload() is False
    assert table.authenticate(bearer(TOK_B)) == Client("lab")


def test_file_mode_checks(tmp_path, caplog):
    path = tmp_path / "tokens"
    write(path, f"pipeline {TOK_A}\n", mode=0o666)
    with pytest.raises(TokensFileError, match="world-writable"):
        TokenTable(tokens_file=str(path))
    write(path, f"pipeline {TOK_A}\n", mode=0o644)  # Kubernetes secret volumes default to 0644
    with caplog.at_level(logging.WARNING, logger="services.teacher.auth"):
        TokenTable(tokens_file=str(path))
    assert "readable by group or others" in caplog.text


def test_config_fields_and_startup_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_client_inflight: must be >= 0"):
        build_config(TeacherConfig, {"model": "m", "max_client_inflight": "-1"}, env={})
    path = tmp_path / "tokens"
    write(path, "pipeline short\n")
    cfg = build_config(TeacherConfig, {"model": "m", "tokens_file": str(path)}, env={})
    with pytest.raises(ConfigError, match="tokens_file: .*shorter than 16"):
        build_token_table(cfg)
    cfg = build_config(TeacherConfig, {"model": "m", "tokens_file": str(tmp_path / "missing")}, env={})
    with pytest.raises(ConfigError, match="tokens_file: .*No such file"):
        build_token_table(cfg)
    write(path, f"pipeline {TOK_A}\n")
    cfg = build_config(TeacherConfig, {"model": "m", "tokens_file": str(path), "token": STATIC}, env={})
    assert [c.name for c in build_token_table(cfg).clients()] == [DEFAULT_CLIENT, "pipeline"]
    assert not build_token_table(build_config(TeacherConfig, {"model": "m"}, env={})).enabled


def test_run_as_sets_the_current_client():
    assert current_client() is None
    assert run_as(Client("lab", 3), current_client) == Client("lab", 3)
    assert current_client() is None
