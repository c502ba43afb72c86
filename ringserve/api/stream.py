"""Rank 0's replies to one generation request, as every front end reads them.

`open_started` sends a request and waits for rank 0 to accept it; `replies` then yields its
deltas and its `done`, with an `IDLE` marker whenever nothing came for a while (streams send a
keep-alive then; whole answers check that their client is still there). Every way the request
can fail is raised as a GenerationError with its status, whatever the endpoint.

Through a restart of the ring: while the keeper (see cluster/keeper.py) is there to bring the
ring back, a request the ring could not start (no rank 0 to send it to, or rank 0 lost the
ring while it waited in the queue) is held and sent again once the ring serves, until the
request's own deadline or until its client leaves. A request whose answer had begun ends with
an error that says the ring lost a rank and that a retry will be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringserve.api.errors import RING_STOPPED
from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.client import RankClient, RankConnection
from ringserve.ipc.keeper_report import KeeperReport, read_report
from ringserve.ipc.messages import (
    NOT_STARTED,
    RANKS_NOT_RUNNING,
    RING_LOST,
    RING_LOST_MESSAGE,
    Delta,
    Done,
    Error,
    GenerationRequest,
    Reply,
    Start,
)


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
# How often a held request looks whether the ring serves again.
HOLD_POLL_S = 0.25
# How many times one request is sent again after the ring lost it before it began (a request
# that itself brought rank 0 down must not do so forever).
MAX_RESENDS = 3
Gone = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class RingLink:
    """The way to rank 0, and where the keeper reports whether the ring will come back (None:
    no keeper, a ring that is not serving is answered 503 at once)."""

    client: RankClient
    run_dir: Path | None = None

    def keeper(self) -> KeeperReport | None:
        return read_report(self.run_dir) if self.run_dir is not None else None

    def watching(self) -> bool:
        report = self.keeper()
        return report is not None and report.watching()

    def holds(self, error: GenerationError) -> bool:
        """Whether a request refused with `error` waits for the ring to be back."""
        report = self.keeper()
        if report is None or not report.watching() or error.status != 503:
            return False
        if error.code in (NOT_STARTED, RANKS_NOT_RUNNING):
            return True
        return report.restarting and error.code != RING_LOST

    def refusal(self, error: GenerationError) -> GenerationError:
        """What a client refused with `error` is told: that the ring cannot go on, when the
        keeper gave it up."""
        report = self.keeper()
        if report is None or report.gave_up is None or error.code != RANKS_NOT_RUNNING:
            return error
        return GenerationError(f"the ring cannot serve: {report.gave_up}", 503, RING_STOPPED)

    def lost_answer(self) -> Error:
        """The end of an answer that was being generated when the ring lost a rank."""
        if self.watching():
            advice = "the ring restarts on its own: send the request again and it will be served"
        else:
            advice = "the ranks are not serving (see `python launch.py status`)"
        return Error(status=503, message=f"{RING_LOST_MESSAGE}; {advice}", code=RING_LOST)


def _ring_lost(reply: Reply | None) -> bool:
    """Whether rank 0 went away, or said it lost the ring."""
    return reply is None or (isinstance(reply, Error) and reply.code in (NOT_STARTED, RING_LOST))


class HeldRequest:
    """A generation request on rank 0's socket, sent again when the ring lost it before its
    answer began; reads like a RankConnection."""

    def __init__(
        self,
        link: RingLink,
        request: GenerationRequest,
        deadline: Deadline,
        gone: Gone | None,
        connection: RankConnection,
    ) -> None:
        self.link = link
        self.request = request
        self.deadline = deadline
        self.gone = gone
        self.connection = connection
        self.answering = False  # a delta or done came: its answer began
        self.resends = 0
        self._resending: asyncio.Task[tuple[RankConnection, Start]] | None = None

    async def next(self, timeout: float) -> Reply | None:
        while True:
            if self._resending is not None:
                self.connection, _ = await asyncio.wait_for(
                    asyncio.shield(self._resending), timeout
                )
                self._resending = None
            reply = await self.connection.next(timeout)
            if isinstance(reply, Delta | Done):
                self.answering = True
                return reply
            if not _ring_lost(reply):
                return reply
            began = self.answering or (isinstance(reply, Error) and reply.code == RING_LOST)
            if not began and self.resends < MAX_RESENDS and self.link.watching():
                await self.connection.close()
                self.resends += 1
                self._resending = asyncio.create_task(
                    _open_held(self.link, self.request, self.deadline, self.gone)
                )
                continue
            return self.link.lost_answer() if began or self.link.watching() else reply

    async def close(self) -> None:
        if self._resending is not None:
            self._resending.cancel()
            with contextlib.suppress(BaseException):
                connection, _ = await self._resending
                await connection.close()
        await self.connection.close()


Started = tuple[HeldRequest, Start]


async def open_started(
    link: RingLink, request: GenerationRequest, deadline: Deadline, gone: Gone | None = None
) -> Started:
    """A socket request that rank 0 accepted (its `start` reply read), or the error it gave.
    While the keeper brings the ring back, the request is held (`gone`: whether its client
    left, which ends the wait)."""
    connection, start = await _open_held(link, request, deadline, gone)
    return HeldRequest(link, request, deadline, gone, connection), start


async def _open_held(
    link: RingLink, request: GenerationRequest, deadline: Deadline, gone: Gone | None
) -> tuple[RankConnection, Start]:
    while True:
        try:
            return await _open_once(link.client, request, deadline)
        except GenerationError as exc:
            if not link.holds(exc):
                raise link.refusal(exc) from None
        await asyncio.sleep(min(HOLD_POLL_S, deadline.remaining()))
        deadline.remaining()  # raises once the request's time is up
        if gone is not None and await gone():
            raise GenerationError("client disconnected", 499, "client_closed")


async def _open_once(
    client: RankClient, request: GenerationRequest, deadline: Deadline
) -> tuple[RankConnection, Start]:
    connection = await client.open(request)
    try:
        reply = await _next(connection, max(deadline.at - time.monotonic(), 0.001))
        if reply is None:  # rank 0 went away before it took the request
            raise GenerationError(RANK0_GONE, 503, RANKS_NOT_RUNNING)
        if not isinstance(reply, Start):
            raise unexpected(reply)
    except BaseException:
        await connection.close()
        raise
    return connection, reply


async def replies(
    connection: HeldRequest, deadline: Deadline, idle_s: float
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


RANK0_GONE = "rank 0 ended the request without an answer (see its log: launch.py logs 0)"


def unexpected(reply: Any) -> GenerationError:
    """The error a reply out of place stands for (None: rank 0 closed the request)."""
    if reply is None:
        return GenerationError(RANK0_GONE, 503, "ranks_unavailable")
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
