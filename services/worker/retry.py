"""How the worker treats a failed call: retry it, skip the prompt, or stop (a misconfiguration).

Transient failures (connection errors, gRPC UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / ABORTED,
HTTP 5xx and 429) are retried with exponential backoff for up to `timeout_s`; a prompt the services reject
as invalid (INVALID_ARGUMENT, OUT_OF_RANGE, HTTP 400/413/422, an unusable answer) is skipped and counted;
anything else is fatal.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import httpx

from services.rollout.client import RolloutError
from services.worker.record import BadPromptError

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
)
_BAD_INPUT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)


class ErrorKind(enum.StrEnum):
    RETRY = "retry"  # transient: call again after a backoff
    BAD_INPUT = "bad_input"  # the services reject this prompt: skip it
    FATAL = "fatal"  # a misconfiguration or a bug: stop the worker


class Stopped(Exception):
    """A stop was requested while a service or Redis call was waiting to be retried."""


def classify_error(exc: BaseException) -> ErrorKind:
    if isinstance(exc, BadPromptError):
        return ErrorKind.BAD_INPUT
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        code = exc.code()
        if code in _RETRY_CODES:
            return ErrorKind.RETRY
        return ErrorKind.BAD_INPUT if code in _BAD_INPUT_CODES else ErrorKind.FATAL
    if isinstance(exc, RolloutError):
        status = exc.status_code
        if status >= 500 or status == 429:
            return ErrorKind.RETRY
        return ErrorKind.BAD_INPUT if status in (400, 413, 422) else ErrorKind.FATAL
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return ErrorKind.RETRY
    return ErrorKind.FATAL


def short(e: BaseException) -> str:
    """One line for a log: a gRPC status and its details, else the exception type and message."""
    if isinstance(e, grpc.RpcError) and isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def call_with_retry(
    fn: Callable[[], T],
    call: str,
    *,
    timeout_s: float,
    stop: threading.Event,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Call `fn`, retrying RETRY-kind failures with exponential backoff (0.5 s doubling to 15 s) for up to
    `timeout_s` after the first failure (a call that ran its own long timeout before failing still gets its
    retries); other failures, and the last one, propagate. `Stopped` when a stop comes during a wait."""
    deadline: float | None = None
    delay, attempt = 0.5, 0
    while True:
        try:
            return fn()
        except Exception as e:
            if deadline is None:
                deadline = time.monotonic() + timeout_s
            if classify_error(e) != ErrorKind.RETRY or time.monotonic() + delay > deadline:
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(call)
            log.warning("%s failed (%s); retry %d in %.1f s", call, short(e), attempt, delay)
            if stop.wait(delay):
                raise Stopped(f"stopped while retrying {call}") from e
            delay = min(delay * 2, 15.0)
