"""Rank 0's end of the Unix socket: one thread per connection, one request per connection."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
from pathlib import Path
from typing import Protocol

from ringserve.engine.requests import PreparedRequest
from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.framing import decode_request, encode, recv_frame
from ringserve.ipc.messages import (
    ClusterInfo,
    Error,
    GenerationRequest,
    InfoRequest,
    Reply,
    TelemetryReply,
    TelemetryRequest,
)

log = logging.getLogger(__name__)
POLL_S = 0.2


class Service(Protocol):
    def info(self) -> ClusterInfo: ...
    def telemetry(self) -> TelemetryReply: ...
    def submit(self, request: GenerationRequest) -> PreparedRequest: ...
    def problem(self) -> str | None: ...


def _peer_closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class RankSocketServer:
    def __init__(self, path: Path, service: Service) -> None:
        self.path = path
        self.service = service
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_forever, name="socket-accept", daemon=True).start()
        log.info("listening on %s", self.path)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_forever(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                body = recv_frame(conn)
                if body is None:
                    return
                request = decode_request(body)
                if isinstance(request, InfoRequest):
                    conn.sendall(encode(self.service.info()))
                elif isinstance(request, TelemetryRequest):
                    conn.sendall(encode(self.service.telemetry()))
                else:
                    self._generate(conn, request)
            except GenerationError as exc:
                error = Error(status=exc.status, message=str(exc), code=exc.code)
                with contextlib.suppress(OSError):
                    conn.sendall(encode(error))
            except ProtocolError as exc:
                log.warning("bad frame on the socket: %s", exc)
                with contextlib.suppress(OSError):
                    conn.sendall(encode(Error(status=400, message=str(exc), code="bad_frame")))
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _generate(self, conn: socket.socket, request: GenerationRequest) -> None:
        problem = self.service.problem()
        if problem is not None:
            conn.sendall(encode(Error(status=503, message=problem, code="ranks_unavailable")))
            return
        try:
            prepared = self.service.submit(request)
        except GenerationError as exc:
            conn.sendall(encode(Error(status=exc.status, message=str(exc), code=exc.code)))
            return
        try:
            self._stream(conn, prepared)
        finally:
            prepared.cancelled.set()

    def _stream(self, conn: socket.socket, prepared: PreparedRequest) -> None:
        while True:
            try:
                reply: Reply | None = prepared.replies.get(timeout=POLL_S)
            except queue.Empty:
                if _peer_closed(conn):
                    log.info("client closed request %d: cancelling", prepared.request_id)
                    return
                problem = self.service.problem()
                if problem is not None:
                    error = Error(status=503, message=problem, code="ranks_unavailable")
                    conn.sendall(encode(error))
                    return
                continue
            if reply is None:
                return
            try:
                conn.sendall(encode(reply))
            except OSError:
                log.info("client went away from request %d: cancelling", prepared.request_id)
                return
