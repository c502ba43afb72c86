"""The API's HTTP connections: how many may be open at once, and how long a client has to send
a request's headers.

uvicorn bounds neither: connections that never send a request pile up until the process runs
out of file descriptors (then every `accept()` fails, new and kept-alive clients alike), and
a client that sends its headers a byte at a time holds its connection for ever. Its h11
protocol, subclassed here, keeps the connections that wait for headers in the order they began
waiting: each is closed when its time is up, and the longest waiting one makes room for a new
connection when all are taken. (A body's pace is the request guard's: `guard.py`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
from collections import OrderedDict
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ringserve.api.errors import error_body

log = logging.getLogger(__name__)

# Descriptors kept for everything but client connections (logs, the listening socket, rank 0's
# socket for the API's own questions); each client connection may hold a second one, to rank 0.
RESERVED_DESCRIPTORS = 64
DESCRIPTORS_PER_CONNECTION = 2
# Asked for when the hard limit is "unlimited" (macOS refuses an unlimited soft limit).
DESCRIPTORS_WANTED = 1 << 16


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, as far as the system
    allows; the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTORS_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return DESCRIPTORS_WANTED if soft == resource.RLIM_INFINITY else soft


def connection_budget(wanted: int, descriptors: int) -> int:
    """Connections the API may hold: `wanted`, or as many as `descriptors` leave room for."""
    room = (descriptors - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION
    return max(1, min(wanted, room))


def _too_many_connections() -> bytes:
    body = json.dumps(
        error_body(
            "the server holds as many connections as it may, all of them busy; retry shortly",
            503,
            "too_many_connections",
        )
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY_CONNECTIONS = _too_many_connections()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a bound on connections and a deadline for headers. Made for
    one server by `bounded_protocol`, which sets the class variables."""

    max_connections: ClassVar[int]
    header_timeout: ClassVar[float]
    # Connections waiting for a request's headers (new, or kept alive after an answer),
    # longest waiting first.
    waiting: ClassVar[OrderedDict[BoundedH11Protocol, asyncio.TimerHandle]]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections and not self._make_room():
            self.transport = transport
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            log.warning(
                "refused a connection: all %d are busy (RINGSERVE_API_MAX_CONNECTIONS)",
                self.max_connections,
            )
            return
        super().connection_made(transport)
        self._wait_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers came
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before its body came whole (413, 408): what is left is not read.
            self.transport.close()
        elif self.conn.their_state is h11.IDLE:
            self._wait_for_headers()

    def _wait_for_headers(self) -> None:
        self._stop_waiting()
        self.waiting[self] = self.loop.call_later(self.header_timeout, self._headers_late)

    def _stop_waiting(self) -> None:
        timer = self.waiting.pop(self, None)
        if timer is not None:
            timer.cancel()

    def _headers_late(self) -> None:
        self.waiting.pop(self, None)
        if not self.transport.is_closing():
            log.warning(
                "closed a connection that sent no request in %.0f s (RINGSERVE_API_READ_TIMEOUT)",
                self.header_timeout,
            )
            self.transport.close()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request, if one waits."""
        if not self.waiting:
            return False
        oldest, timer = self.waiting.popitem(last=False)
        timer.cancel()
        oldest.transport.close()
        return True


def bounded_protocol(max_connections: int, header_timeout: float) -> type[BoundedH11Protocol]:
    """The protocol class for one server (uvicorn's `http=`)."""
    return type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {
            "max_connections": max_connections,
            "header_timeout": header_timeout,
            "waiting": OrderedDict(),
        },
    )
