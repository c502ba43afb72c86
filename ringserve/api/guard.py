"""What every request passes before a route reads its body: the API key, and the body's size
and pace.

An ASGI middleware rather than a FastAPI dependency, because FastAPI reads and parses a body
before it runs a route's dependencies: a client without a key, or with a body no prompt that
fits the context could need, is turned away having sent only its headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringserve.api.errors import error_body, speaks_anthropic
from ringserve.errors import GenerationError
from ringserve.ipc.bounds import BodyBounds
from ringserve.ipc.messages import Generating

# Reachable without a key: liveness and readiness probes, and the API's own description.
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/openapi.json", "/docs", "/redoc"})
# A body has the read timeout, and a second more for each this many bytes, to arrive whole: a
# large body over a slow link gets there, one sent a byte at a time is cut off.
MIN_BODY_BYTES_PER_S = 64 * 1024
# What a refused client may still send of its body, read and dropped, before the connection
# closes.
LINGER_BYTES = 32 * 1024 * 1024
LINGER_S = 10.0


class BodyTooLarge(HTTPException):
    """Raised while a route reads the body (FastAPI passes HTTP exceptions on as they are)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit} bytes, more than any prompt that fits "
            "this model's context needs",
        )


class BodyTooSlow(HTTPException):
    def __init__(self, seconds: float, received: int) -> None:
        super().__init__(
            408,
            f"the request body did not arrive in time ({received} bytes in {seconds:.0f} s)",
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


def salted_scope(scope: str, salt: str | None) -> str:
    """A request's cache scope with its `cache_salt`: it reuses only prompts cached under the
    same key and the same salt."""
    if salt is None:
        return scope
    return hashlib.sha256(f"{scope}\0{salt}".encode()).hexdigest()[:16]


AnyGenerating = TypeVar("AnyGenerating", bound=Generating)


def sent_by(request: AnyGenerating, scope: str) -> AnyGenerating:
    """A generation request marked with its client (the key's scope, `http.state.cache_scope`),
    whose share of the batch rank 0 keeps fair."""
    return request.model_copy(update={"client": scope})


class RequestGuard:
    """`keys`: the clients' keys; `admin_keys`: keys that also see every key's activity
    (none: every key does when there is only one, and every client when there are no keys).
    `bounds`: what a body may hold now (raises GenerationError while rank 0 cannot say)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        admin_keys: Sequence[str],
        bounds: Callable[[], Awaitable[BodyBounds]],
        read_timeout: float,
        open_paths: frozenset[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.keys = [key.encode() for key in (*keys, *admin_keys)]
        self.admin_keys = [key.encode() for key in admin_keys]
        if not self.admin_keys and len(self.keys) == 1:
            self.admin_keys = self.keys
        self.bounds = bounds
        self.read_timeout = read_timeout
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        if self.keys and scope["path"] not in self.open_paths and not _among(key, self.keys):
            await _refuse(
                scope, send, 401, "invalid or missing API key", "invalid_api_key", receive
            )
            return
        state = scope.setdefault("state", {})
        state["cache_scope"] = cache_scope(key)
        state["admin"] = not self.keys or _among(key, self.admin_keys)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            bounds = await self.bounds()
        except GenerationError as exc:
            await _refuse(scope, send, exc.status, str(exc), exc.code)
            return
        declared = _content_length(scope["headers"])
        if declared is not None and declared > bounds.max_bytes:
            refusal = BodyTooLarge(bounds.max_bytes).detail
            await _refuse(scope, send, 413, refusal, "request_too_large", receive)
            return
        state["body_bounds"] = bounds
        await self.app(scope, _bounded(receive, bounds.max_bytes, self.read_timeout), send)


def _among(key: bytes | None, keys: Sequence[bytes]) -> bool:
    # Compare against every key, so the time taken says nothing about which one is close.
    matches = [hmac.compare_digest(key or b"", known) for known in keys]
    return key is not None and any(matches)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _bounded(receive: Receive, limit: int, timeout: float) -> Receive:
    """`receive` that raises BodyTooLarge once more than `limit` bytes of body arrived (a
    chunked body declares no length), and BodyTooSlow when the body is not whole within
    `timeout` seconds and a second per MIN_BODY_BYTES_PER_S bytes received."""
    received = 0
    started = time.monotonic()
    whole = False

    async def bounded() -> Message:
        nonlocal received, whole
        if whole:  # after the body: a disconnect, waited for as long as the answer takes
            return await receive()
        left = started + timeout + received / MIN_BODY_BYTES_PER_S - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), max(left, 0))
        except TimeoutError:
            raise BodyTooSlow(time.monotonic() - started, received) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            whole = not message.get("more_body", False)
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return bounded


async def _linger(receive: Receive) -> None:
    """After an early answer, read and drop what the client still sends of its body (up to
    LINGER_BYTES, for up to LINGER_S): a client that sends its whole body before it reads
    (urllib) then reads the answer, rather than a reset of a connection closed under it."""
    dropped = 0
    deadline = time.monotonic() + LINGER_S
    while dropped < LINGER_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _refuse(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    code: str | None,
    linger: Receive | None = None,
) -> None:
    """Answer `status` before the body is read; with `linger`, what the client still sends of
    its body is read and dropped before the answer ends (see _linger)."""
    anthropic = speaks_anthropic(scope["path"])
    body = json.dumps(error_body(message, status, code, anthropic=anthropic)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": linger is not None})
    if linger is not None:
        # The answer is out whole (its length says so); it ends only after the drain, since
        # nothing of the body can be received once it has.
        await _linger(linger)
        await send({"type": "http.response.body", "body": b""})
