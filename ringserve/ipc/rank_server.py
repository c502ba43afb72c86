"""Rank 0's end of the Unix socket: one thread per connection, one request per connection.

Connections are bounded (a client past the bound is answered 503 at once), and a connection
must send its request within REQUEST_READ_TIMEOUT_S: neither a flood of idle connections nor
one that announces a frame and falls silent holds a thread for long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import stat
import threading
from pathlib import Path
from typing import Protocol

from ringserve.engine.requests import PreparedRequest
from ringserve.errors import GenerationError, LaunchError, ProtocolError
from ringserve.ipc.framing import decode_request, encode, recv_frame
from ringserve.ipc.messages import (
    NOT_STARTED,
    NOT_STARTED_MESSAGE,
    TOO_MANY_CONNECTIONS,
    ClusterInfo,
    CountRequest,
    Error,
    GenerationRequest,
    InfoRequest,
    Reply,
    TelemetryReply,
    TelemetryRequest,
    TokenCount,
)

log = logging.getLogger(__name__)
POLL_S = 0.2
REQUEST_READ_TIMEOUT_S = 10.0
# A reply rank 0 cannot hand to the API within this long means the API stopped reading.
SEND_TIMEOUT_S = 60.0
# Connections beyond the requests the queue can hold: the one being served, and health, info
# and telemetry calls.
EXTRA_CONNECTIONS = 32


class Service(Protocol):
    def info(self) -> ClusterInfo: ...
    def telemetry(self) -> TelemetryReply: ...
    def count(self, request: CountRequest) -> TokenCount: ...
    def submit(self, request: GenerationRequest) -> PreparedRequest: ...
    def problem(self) -> str | None: ...
    def broken(self) -> bool: ...


def _turn_away(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        conn.settimeout(1.0)
        message = "rank 0 has too many open connections; retry later"
        conn.sendall(encode(Error(status=503, message=message, code=TOO_MANY_CONNECTIONS)))


def _peer_closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def claim_socket_path(path: Path) -> None:
    """Make `path` free for a new socket: create its directory (only the user may enter a
    directory made here; an existing one is left as it is), remove a stale socket. A live
    socket (another ring serving there) and anything that is not a socket are refused."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LaunchError(f"{path} exists and is not a socket; refusing to replace it")
    if socket_in_use(path):
        raise LaunchError(f"another ring is serving on {path}; stop it first (launch.py stop)")
    path.unlink()  # nobody listens: left behind by a rank that did not stop cleanly


def socket_in_use(path: Path) -> bool:
    """Whether a process listens on the Unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class RankSocketServer:
    def __init__(self, path: Path, service: Service, max_connections: int = 64) -> None:
        self.path = path
        self.service = service
        self._listener: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._owned = False
        self._streaming = 0  # generation requests whose replies are still being sent
        self._quiet = threading.Condition()

    def start(self) -> None:
        claim_socket_path(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self._listener = listener
        self._owned = True
        threading.Thread(target=self._accept_forever, name="socket-accept", daemon=True).start()
        log.info("listening on %s", self.path)

    def wait_quiet(self, timeout: float) -> None:
        """Wait (at most `timeout`) until every generation request has had its last reply."""
        with self._quiet:
            self._quiet.wait_for(lambda: self._streaming == 0, timeout)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._owned:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _accept_forever(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                threading.Thread(target=_turn_away, args=(conn,), daemon=True).start()
                continue
            threading.Thread(target=self._serve_in_slot, args=(conn,), daemon=True).start()

    def _serve_in_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(REQUEST_READ_TIMEOUT_S)
                body = recv_frame(conn)
                conn.settimeout(SEND_TIMEOUT_S)
                if body is None:
                    return
                request = decode_request(body)
                if isinstance(request, InfoRequest):
                    conn.sendall(encode(self.service.info()))
                elif isinstance(request, TelemetryRequest):
                    conn.sendall(encode(self.service.telemetry()))
                elif isinstance(request, CountRequest):
                    conn.sendall(encode(self.service.count(request)))
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
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            except Exception as exc:
                log.exception("a socket request failed")
                error = Error(status=500, message=f"rank 0 failed: {exc}", code="internal_error")
                with contextlib.suppress(OSError):
                    conn.sendall(encode(error))

    def _generate(self, conn: socket.socket, request: GenerationRequest) -> None:
        problem = self.service.problem()
        if problem is not None:
            if self.service.broken():
                error = Error(status=503, message=NOT_STARTED_MESSAGE, code=NOT_STARTED)
            else:
                error = Error(status=503, message=problem, code="ranks_unavailable")
            conn.sendall(encode(error))
            return
        try:
            prepared = self.service.submit(request)
        except GenerationError as exc:
            conn.sendall(encode(Error(status=exc.status, message=str(exc), code=exc.code)))
            return
        with self._quiet:
            self._streaming += 1
        try:
            self._stream(conn, prepared)
        finally:
            prepared.cancelled.set()
            with self._quiet:
                self._streaming -= 1
                self._quiet.notify_all()

    def _stream(self, conn: socket.socket, prepared: PreparedRequest) -> None:
        while True:
            try:
                reply: Reply | None = prepared.replies.get(timeout=POLL_S)
            except queue.Empty:
                if _peer_closed(conn):
                    log.info("client closed request %d: cancelling", prepared.request_id)
                    return
                # A stalled ring ends the answers being generated; a waiting request waits on:
                # the ring recovers, or it is lost and the request is told it never started.
                problem = self.service.problem() if prepared.admitted else None
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
