"""Rank 0's replies to one generation request, as every front end reads them.

`open_started` sends a request and waits for rank 0 to accept it; `replies` then yields its
deltas and its `done`, with an `IDLE` marker whenever nothing came for a while (streams send a
keep-alive then; whole answers check that their client is still there). Every way the request
can fail is raised as a GenerationError with its status, whatever the endpoint.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.client import RankClient, RankConnection
from ringserve.ipc.messages import Delta, Done, Error, GenerationRequest, Start


@dataclass(frozen=True)
class Deadline:
    """The time by which a whole request (all of its choices) must be answered."""

    timeout: float
    at: float  # time.monotonic()

    @classmethod
    def after(cls, timeout: float) -> Deadline:
        return cls(timeout, time.monotonic() + timeout)

    def remaining(self) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise GenerationError(
                f"the request took longer than {self.timeout:.0f} s", 504, "timeout"
            )
        return remaining


class Idle:
    """Nothing came from rank 0 within the idle interval."""


IDLE = Idle()
# How long a stream waits for a reply before it sends a keep-alive.
KEEPALIVE_S = 5.0
# How often a whole answer checks that its client is still there.
DISCONNECT_POLL_S = 0.25
Started = tuple[RankConnection, Start]


async def open_started(
    client: RankClient, request: GenerationRequest, deadline: Deadline
) -> Started:
    """A socket request that rank 0 accepted (its `start` reply read), or the error it gave."""
    connection = await client.open(request)
    try:
        reply = await _next(connection, max(deadline.at - time.monotonic(), 0.001))
        if not isinstance(reply, Start):
            raise unexpected(reply)
    except BaseException:
        await connection.close()
        raise
    return connection, reply


async def replies(
    connection: RankConnection, deadline: Deadline, idle_s: float
) -> AsyncIterator[Delta | Done | Idle]:
    """The request's deltas, then its `done` (the last item); IDLE after `idle_s` without one."""
    while True:
        try:
            reply = await connection.next(min(idle_s, deadline.remaining()))
        except TimeoutError:
            yield IDLE
            continue
        except ProtocolError as exc:
            raise GenerationError(str(exc), 502, "bad_reply") from exc
        if isinstance(reply, Delta):
            yield reply
        elif isinstance(reply, Done):
            yield reply
            return
        else:
            raise unexpected(reply)


async def _next(connection: RankConnection, timeout: float) -> Any:
    try:
        reply = await connection.next(timeout)
    except TimeoutError as exc:
        raise GenerationError(f"no answer within {timeout:.0f} s", 504, "timeout") from exc
    except ProtocolError as exc:
        raise GenerationError(str(exc), 502, "bad_reply") from exc
    return reply


def unexpected(reply: Any) -> GenerationError:
    """The error a reply out of place stands for (None: rank 0 closed the request)."""
    if reply is None:
        return GenerationError(
            "rank 0 ended the request without an answer (see its log: launch.py logs 0)",
            503,
            "ranks_unavailable",
        )
    if isinstance(reply, Error):
        return GenerationError(reply.message, reply.status, reply.code)
    return GenerationError(f"unexpected reply {reply.kind!r} from rank 0", 502, "bad_reply")


class Watch:
    """Notices, within DISCONNECT_POLL_S, that the client of a whole (not streamed) answer went
    away, tokens flowing or not: `check` raises then (closing the socket request cancels the
    generation on the ranks)."""

    def __init__(self, is_disconnected: Callable[[], Awaitable[bool]]) -> None:
        self.is_disconnected = is_disconnected
        self.next_check = time.monotonic() + DISCONNECT_POLL_S

    async def check(self) -> None:
        if time.monotonic() < self.next_check:
            return
        if await self.is_disconnected():
            raise GenerationError("client disconnected", 499, "client_closed")
        self.next_check = time.monotonic() + DISCONNECT_POLL_S
