"""Request body size limits, enforced before a body is held in memory (ASGI middleware).

A declared `Content-Length` over the limit is answered 413 before a byte of the body is read; a body
without one (chunked) is counted as it streams in and refused with 413 as soon as it passes the limit, so
a client cannot make the service buffer more than the limit plus one chunk. Limits per route: the weight
upload (`PUT /v1/weights`) gets `max_weights_bytes`, every other request `max_request_bytes`. (The weight
route also refuses, before reading any data, a body whose safetensors header declares more: api.py.)
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def route_limit(max_request_bytes: int, max_weights_bytes: int) -> Callable[[Scope], tuple[int, str]]:
    """(limit, config field name) of a request."""

    def limit_of(scope: Scope) -> tuple[int, str]:
        if scope["method"] == "PUT" and scope["path"] == "/v1/weights":
            return max_weights_bytes, "max_weights_bytes"
        return max_request_bytes, "max_request_bytes"

    return limit_of


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_of: Callable[[Scope], tuple[int, str]]) -> None:
        self.app, self.limit_of = app, limit_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, name = self.limit_of(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            text = declared.decode("latin-1")
            if not text.isdigit():
                await _reply(send, 400, f"invalid Content-Length {text[:40]!r}")
                return
            if int(text) > limit:
                await _reply(send, 413, f"body of {text} bytes exceeds {name} {limit}")
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the handler's body read: FastAPI turns it into the 413 response
                    raise HTTPException(413, f"body exceeds {name} {limit}")
            return message

        await self.app(scope, counted, send)


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
