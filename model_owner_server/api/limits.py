"""Request body size limit for every route except the adapter upload (which has its own, larger caps),
and NUL characters in the URL refused up front.

A pure ASGI middleware, so it runs before routing, dependencies and body parsing:
- a declared `Content-Length` over the limit is answered 413 without calling `receive` at all;
- a body without `Content-Length` (chunked) is counted as it arrives and refused with 413 the moment it
  passes the limit, so a client can never make the server buffer more than the limit.
The adapter upload route (`POST /v1/emulators/{id}/adapters`) streams its body under per-part caps
derived from the emulator (api/upload.py) and is exempt here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPLOAD_PATH = re.compile(r"/v1/emulators/[^/]+/adapters/?$")


def is_upload(method: str, path: str) -> bool:
    return method == "POST" and UPLOAD_PATH.search(path) is not None


class RequestTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes the limit. An HTTPException, so FastAPI's body
    parsing re-raises it unchanged and the app's handler answers 413 in the usual error shape."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes for this endpoint")


class BodySizeLimitMiddleware:
    def __init__(
        self, app: Callable[..., Awaitable[None]], max_bytes: int, exempt: Callable[[str, str], bool] = is_upload
    ):
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # NUL can name nothing here (ids and names never contain it) and PostgreSQL refuses it in text.
        if "\x00" in scope.get("path", ""):
            await _error(send, 404, "not_found", "no such resource (the URL contains a NUL character)")
            return
        if b"%00" in scope.get("query_string", b"") or b"\x00" in scope.get("query_string", b""):
            await _error(send, 422, "validation_error", "query parameters must not contain NUL characters")
            return
        if self.exempt(scope.get("method", ""), scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers") or ():
            if name.lower() == b"content-length":
                declared = value
                break
        if declared is not None:
            try:
                length = int(declared)
                if length < 0:
                    raise ValueError
            except ValueError:
                await _error(send, 400, "bad_request", "invalid Content-Length header")
                return
            if length > self.max_bytes:
                await _error(
                    send,
                    413,
                    "payload_too_large",
                    f"request body is {length} bytes; this endpoint accepts at most {self.max_bytes}",
                )
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge as exc:  # read outside FastAPI's body parsing (e.g. by a middleware)
            if started:
                raise
            await _error(send, 413, "payload_too_large", str(exc.detail))


async def _error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
