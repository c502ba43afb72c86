"""api.py's end of the Unix socket (asyncio): one connection per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.framing import decode_reply, encode, read_frame, recv_frame
from ringserve.ipc.messages import (
    RANKS_NOT_RUNNING,
    TOO_MANY_CONNECTIONS,
    Error,
    Reply,
    Request,
)

log = logging.getLogger(__name__)


# Sees every reply rank 0 sends (the API's metrics count them there).
ReplyObserver = Callable[[Reply], None]


class RankConnection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_reply: ReplyObserver | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_reply = on_reply

    async def next(self, timeout: float) -> Reply | None:
        """The next reply, None when rank 0 closed the stream; TimeoutError after `timeout`."""
        try:
            body = await asyncio.wait_for(read_frame(self.reader), timeout)
        except ConnectionError:  # rank 0 went away with our request unread
            return None
        if body is None:
            return None
        reply = decode_reply(body)
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


TURNED_AWAY_READ_S = 1.0


def _busy() -> GenerationError:
    return GenerationError(
        "rank 0 cannot take more connections now; retry later", 503, TOO_MANY_CONNECTIONS
    )


async def _answer_if_any(connection: RankConnection) -> Reply | None:
    with contextlib.suppress(TimeoutError, ProtocolError, OSError):
        return await connection.next(TURNED_AWAY_READ_S)
    return None


class RankClient:
    def __init__(self, socket_path: Path, on_reply: ReplyObserver | None = None) -> None:
        self.socket_path = socket_path
        self.on_reply = on_reply

    async def open(self, request: Request) -> RankConnection:
        try:
            frame = encode(request)
        except ProtocolError as exc:
            raise GenerationError(str(exc), 413, "request_too_large") from exc
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            log.debug("no answer on %s: %s", self.socket_path, exc)
            raise GenerationError(
                "the ranks are not serving: they may still be loading, or stopped; see "
                "`python launch.py status`",
                503,
                RANKS_NOT_RUNNING,
            ) from exc
        except OSError as exc:  # its queue of connections to accept is full, say
            raise _busy() from exc
        connection = RankConnection(reader, writer, self.on_reply)
        try:
            writer.write(frame)
            await writer.drain()
        except OSError as exc:
            # Rank 0 turned the connection away (too many open) before reading our request:
            # its answer may be waiting to be read.
            turned_away = await _answer_if_any(connection)
            await connection.close()
            if isinstance(turned_away, Error):
                status, code = turned_away.status, turned_away.code
                raise GenerationError(turned_away.message, status, code) from exc
            raise _busy() from exc
        return connection

    async def call(self, request: Request, timeout: float) -> Reply:
        """A request answered by exactly one reply (info, telemetry)."""
        connection = await self.open(request)
        try:
            reply = await connection.next(timeout)
        except TimeoutError as exc:
            raise GenerationError("rank 0 did not answer in time", 504, "timeout") from exc
        finally:
            await connection.close()
        if reply is None:
            raise GenerationError("rank 0 closed the connection", 503, "ranks_unavailable")
        if isinstance(reply, Error):
            raise GenerationError(reply.message, reply.status, reply.code)
        return reply


def ask_rank0(socket_path: Path, request: Request, timeout: float) -> Reply:
    """A request answered by exactly one reply, asked from a plain thread (the keeper). Raises
    OSError when nobody answers, ProtocolError on a bad reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(encode(request))
        body = recv_frame(sock)
    if body is None:
        raise ProtocolError("rank 0 closed the connection without an answer")
    return decode_reply(body)
