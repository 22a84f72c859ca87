"""Teacher clients: named bearer tokens, a tokens file re-read while serving, constant-time lookup.

A client is a name plus its limits. The name comes from the server's own configuration (the tokens file, or
"default" for the single `token`/`token_file`), never from the network, so metric labels stay bounded.

Tokens file (`tokens_file`), one client per line, `#` starts a comment, blank lines are skipped:

    # name       token                              options
    pipeline     6f1c0e...(at least 16 characters)
    lab-trainer  9b27d4...                          max_inflight=8

A name is 1-64 characters of `A-Z a-z 0-9 _ . -` starting with a letter or digit; a token is at least 16
non-space characters; names and tokens are unique. `max_inflight=N` overrides the server's
`max_client_inflight` for that client. Errors name the file and the line, never the token.

Reload: `authenticate` stats the file at most once a second (`CHECK_INTERVAL_S`) and re-reads it when its
inode, size, mtime or ctime changed; `reload()` (SIGHUP) re-reads at once. A file that cannot be read or
parsed, is world-writable, or holds no client keeps the previous table and logs an error: a bad edit never
stops the server and never opens it. Write the file atomically (a temporary file, then rename) so a reload
never sees half of it; a read during which the file changed is retried at the next check.

Lookup: the presented token is hashed (sha256) and compared with every stored digest by
`hmac.compare_digest`, without stopping at a match, so the time taken tells nothing about the tokens. Only
the digests are kept in memory.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the one client of a server without tokens
DEFAULT_CLIENT = "default"  # the client of the single `token` / `token_file`
CHECK_INTERVAL_S = 1.0
MIN_TOKEN_CHARS = 16
MAX_CLIENTS = 1000  # bounds the metric labels a file can create
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCHEME = "Bearer "


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the line, never a token."""


@dataclass(frozen=True)
class Client:
    name: str
    max_inflight: int | None = None  # None: the server's max_client_inflight


@dataclass(frozen=True)
class _Entry:
    digest: bytes  # sha256 of the token
    client: Client


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens_file(text: str, source: str) -> list[tuple[str, Client]]:
    """(token, client) per line of a tokens file. Raises TokensFileError naming `source` and the line."""
    out: list[tuple[str, Client]] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source}:{lineno}"
        if len(fields) < 2:
            raise TokensFileError(f"{where}: expected `name token [max_inflight=N]`, got a name alone")
        name, token, options = fields[0], fields[1], fields[2:]
        if not NAME_RE.fullmatch(name):
            raise TokensFileError(
                f"{where}: client name {name[:64]!r} is not 1-64 characters of A-Z a-z 0-9 _ . - "
                "starting with a letter or digit"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise TokensFileError(
                f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters"
            )
        if name in names:
            raise TokensFileError(f"{where}: client {name!r} appears twice")
        digest = _digest(token)
        if digest in digests:
            raise TokensFileError(f"{where}: the token of {name!r} is also another client's token")
        max_inflight = None
        for column, option in enumerate(options, start=3):
            key, _, value = option.partition("=")
            if key != "max_inflight":
                # Not echoed: a token pasted in the wrong column must not reach the log.
                raise TokensFileError(f"{where}: column {column} is no known option (known: max_inflight=N)")
            if not value.isdigit() or int(value) < 1:
                raise TokensFileError(f"{where}: max_inflight must be an integer >= 1")
            max_inflight = int(value)
        names.add(name)
        digests.add(digest)
        out.append((token, Client(name, max_inflight)))
    if not out:
        raise TokensFileError(f"{source}: no clients (a tokens file that revokes everyone is refused)")
    if len(out) > MAX_CLIENTS:
        raise TokensFileError(f"{source}: {len(out)} clients, over the limit of {MAX_CLIENTS}")
    return out


def _signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class TokenTable:
    """The clients a server accepts: the static token (client "default") plus the tokens file's clients.

    `authenticate` is called by every gRPC thread; reloads swap the whole table under a lock.
    """

    def __init__(
        self,
        static_token: str | None = None,
        tokens_file: str | None = None,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tokens_file = tokens_file
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._static = (
            () if static_token is None else (_Entry(_digest(static_token), Client(DEFAULT_CLIENT)),)
        )
        self._entries: tuple[_Entry, ...] = self._static
        self._seen: tuple[int, ...] | None = None  # the file version last read (parsed or refused)
        self._last_error = ""  # logged once until it changes
        self._checked_at = clock()
        self.reloads = 0  # successful reads of the tokens file, the first one included
        if tokens_file is not None:
            self._entries = self._static + self._read()  # TokensFileError at startup: refuse to start

    @property
    def enabled(self) -> bool:
        """False when no token of any kind is configured (every caller is ANONYMOUS)."""
        return bool(self._static) or self.tokens_file is not None

    def clients(self) -> list[Client]:
        return [e.client for e in self._entries]

    def authenticate(self, authorization: str) -> Client | None:
        """The client whose token `authorization` ("Bearer <token>") carries, or None."""
        self.maybe_reload()
        if not authorization.startswith(SCHEME):
            return None
        given = _digest(authorization[len(SCHEME) :])
        found: Client | None = None
        for entry in self._entries:  # every entry, no early exit
            if hmac.compare_digest(entry.digest, given):
                found = entry.client
        return found

    def maybe_reload(self) -> None:
        """Re-read the tokens file if it changed; stats it at most once per `check_interval_s`."""
        if self.tokens_file is None or self._clock() - self._checked_at < self.check_interval_s:
            return
        with self._lock:
            if self._clock() - self._checked_at < self.check_interval_s:
                return  # another thread just checked
            self._checked_at = self._clock()
            try:
                changed = _signature(os.stat(self.tokens_file)) != self._seen
            except OSError as e:
                self._error(f"tokens file {self.tokens_file}: {e.strerror}")
                return
            if changed:
                self._reload_locked()

    def reload(self) -> bool:
        """Re-read the tokens file now (SIGHUP). True when the table was replaced."""
        if self.tokens_file is None:
            return False
        with self._lock:
            self._checked_at = self._clock()
            return self._reload_locked()

    def _reload_locked(self) -> bool:
        try:
            entries = self._static + self._read()
        except TokensFileError as e:
            self._error(str(e))
            return False
        self._last_error = ""
        before = {e.client.name for e in self._entries}
        after = {e.client.name for e in entries}
        self._entries = entries
        log.info(
            "tokens file %s reloaded: %d clients (added %s, removed %s)",
            self.tokens_file,
            len(entries),
            sorted(after - before) or "none",
            sorted(before - after) or "none",
        )
        return True

    def _error(self, message: str) -> None:
        if message != self._last_error:
            log.error("%s; keeping the previous %d clients", message, len(self._entries))
        self._last_error = message

    def _read(self) -> tuple[_Entry, ...]:
        """Parse the tokens file; sets the signature it was read at. Raises TokensFileError."""
        assert self.tokens_file is not None
        path = self.tokens_file
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            after = os.stat(path)
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise TokensFileError(f"tokens file {path}: {why}") from None
        if _signature(st) != _signature(after):
            raise TokensFileError(
                f"tokens file {path}: changed while being read; trying again at the next check"
            )
        self._seen = _signature(st)  # a refused version is not parsed (nor logged) again
        if not stat.S_ISREG(st.st_mode):
            raise TokensFileError(f"tokens file {path}: not a regular file")
        if st.st_mode & stat.S_IWOTH:
            raise TokensFileError(f"tokens file {path}: world-writable (anyone could add a token); chmod o-w")
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning(
                "tokens file %s is readable by group or others (mode %o); chmod 600 is safer",
                path,
                stat.S_IMODE(st.st_mode),
            )
        parsed = parse_tokens_file(text, f"tokens file {path}")
        if any(c.name == DEFAULT_CLIENT for _, c in parsed) and self._static:
            raise TokensFileError(
                f"tokens file {path}: client name {DEFAULT_CLIENT!r} is taken by `token`/`token_file`"
            )
        static_digests = {e.digest for e in self._static}
        if any(_digest(t) in static_digests for t, _ in parsed):
            raise TokensFileError(f"tokens file {path}: a client's token equals `token`/`token_file`")
        self.reloads += 1
        return tuple(_Entry(_digest(token), client) for token, client in parsed)


# The authenticated client of the call a gRPC thread is serving (set by the server's interceptor).
_current: contextvars.ContextVar[Client | None] = contextvars.ContextVar("teacher_client", default=None)


def current_client() -> Client | None:
    """The client the server's interceptor authenticated for this call; None when auth is off."""
    return _current.get()


def run_as(client: Client, fn: Callable[..., object], *args: object) -> object:
    """Call `fn(*args)` with `current_client()` returning `client`."""
    token = _current.set(client)
    try:
        return fn(*args)
    finally:
        _current.reset(token)
