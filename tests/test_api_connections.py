"""The API's HTTP server against clients that hold connections: a real uvicorn server with the
API's protocol and request guard (in a thread of this process), and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request

from ringserve.api.connections import bounded_protocol, connection_budget
from ringserve.api.errors import install_error_handlers
from ringserve.api.guard import RequestGuard
from ringserve.ipc.bounds import BodyBounds
from tests.ring import free_port

HEADER_TIMEOUT = 0.5


async def bounds() -> BodyBounds:
    return BodyBounds(context_limit=1024, max_bytes=1 << 20)


def small_app() -> FastAPI:
    """Routes that read a body or take their time, behind the API's guard and error handlers
    (the body's read timeout is the headers')."""
    app = FastAPI()
    app.add_middleware(
        RequestGuard, keys=(), admin_keys=(), bounds=bounds, read_timeout=HEADER_TIMEOUT
    )
    install_error_handlers(app)

    @app.get("/")
    async def hello() -> dict[str, str]:
        return {"hello": "there"}

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(1.0)
        return {"slow": "indeed"}

    @app.post("/")
    async def length(request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    return app


@contextlib.contextmanager
def serving(max_connections: int) -> Iterator[int]:
    """The small app served on a free port with the API's protocol."""
    app = small_app()
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=bounded_protocol(max_connections, HEADER_TIMEOUT),
        lifespan="off",
        log_config=None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def answer(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1]:
            break
    return data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (what it sends first is skipped)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def ask(port: int, path: str = "/") -> bytes:
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return answer(sock)


def test_a_connection_that_sends_no_request_is_closed() -> None:
    with serving(max_connections=8) as port, connect(port) as silent:
        assert closed_within(silent, HEADER_TIMEOUT + 2)


def test_headers_sent_a_byte_at_a_time_are_cut_off() -> None:
    with serving(max_connections=8) as port, connect(port) as slow:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.05)
        assert closed_within(slow, 2)
        assert time.monotonic() - started < HEADER_TIMEOUT + 3


def test_a_body_sent_a_byte_at_a_time_is_answered_408() -> None:
    with serving(max_connections=8) as port, connect(port) as slow:
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(100):
                slow.sendall(b"a")
                time.sleep(0.05)
        reply = answer(slow)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"did not arrive in time" in reply
        assert closed_within(slow, 2)


def test_idle_connections_make_room_for_new_clients() -> None:
    with serving(max_connections=4) as port:
        idle = [connect(port) for _ in range(4)]
        try:
            time.sleep(0.1)
            assert ask(port).startswith(b"HTTP/1.1 200")
            assert closed_within(idle[0], 1)  # the longest idle one made room
        finally:
            for sock in idle:
                sock.close()


def test_a_kept_alive_connection_serves_request_after_request() -> None:
    with serving(max_connections=4) as port, connect(port) as kept:
        for _ in range(3):
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer(kept).startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT / 2)


def test_when_every_connection_is_busy_one_more_is_answered_503() -> None:
    with serving(max_connections=2) as port:
        busy = [connect(port) for _ in range(2)]
        try:
            for sock in busy:
                sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            refused = ask(port)
            assert refused.startswith(b"HTTP/1.1 503"), refused
            assert b"retry-after: 1" in refused.lower()
            assert b'"too_many_connections"' in refused
            for sock in busy:
                assert answer(sock).startswith(b"HTTP/1.1 200")
        finally:
            for sock in busy:
                sock.close()


@pytest.mark.parametrize(
    ("wanted", "descriptors", "budget"),
    [(1000, 1024, 480), (1000, 65536, 1000), (10, 100, 10), (1000, 10, 1)],
)
def test_connections_fit_the_files_the_process_may_open(
    wanted: int, descriptors: int, budget: int
) -> None:
    assert connection_budget(wanted, descriptors) == budget
