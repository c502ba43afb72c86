"""What every request passes before a route reads its body: the API key, and the body's size.

An ASGI middleware rather than a FastAPI dependency, because FastAPI reads and parses a body
before it runs a route's dependencies: a client without a key, or with a body no prompt that
fits the context could need, is turned away having sent only its headers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Sequence

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringserve.api.errors import error_body, speaks_anthropic

# Reachable without a key: liveness and readiness probes, and the API's own description.
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/openapi.json", "/docs", "/redoc"})


class BodyTooLarge(HTTPException):
    """Raised while a route reads the body (FastAPI passes HTTP exceptions on as they are)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit} bytes, more than any prompt that fits "
            "this model's context needs",
        )


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key a client sent: `Authorization: Bearer <key>` (OpenAI) or `x-api-key` (Anthropic)."""
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
        if name == b"x-api-key":
            return value.strip()
    return None


def cache_scope(key: bytes | None) -> str:
    """The prefix-cache scope of a key: requests under one key may reuse each other's prompts.
    Without configured keys it is whatever the client sent (the SDKs always send something)."""
    return hashlib.sha256(key or b"").hexdigest()[:16]


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        body_limit: Callable[[], Awaitable[int]],
        open_paths: frozenset[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.body_limit = body_limit
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        if self.keys and scope["path"] not in self.open_paths and not self._known(key):
            await _refuse(scope, send, 401, "invalid or missing API key", "invalid_api_key")
            return
        scope.setdefault("state", {})["cache_scope"] = cache_scope(key)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = await self.body_limit()
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            await _refuse(scope, send, 413, BodyTooLarge(limit).detail, "request_too_large")
            return
        await self.app(scope, _counting(receive, limit), send)

    def _known(self, key: bytes | None) -> bool:
        # Compare against every key, so the time taken says nothing about which one is close.
        matches = [hmac.compare_digest(key or b"", known) for known in self.keys]
        return key is not None and any(matches)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises BodyTooLarge once more than `limit` bytes of body arrived (a
    chunked body declares no length)."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return counted


async def _refuse(scope: Scope, send: Send, status: int, message: str, code: str) -> None:
    anthropic = speaks_anthropic(scope["path"])
    body = json.dumps(error_body(message, status, code, anthropic=anthropic)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
