"""api.py's end of the Unix socket (asyncio): one connection per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.framing import decode_reply, encode, read_frame
from ringserve.ipc.messages import Error, Reply, Request

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
        body = await asyncio.wait_for(read_frame(self.reader), timeout)
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
                "ranks_unavailable",
            ) from exc
        writer.write(frame)
        await writer.drain()
        return RankConnection(reader, writer, self.on_reply)

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
