"""Length-prefixed JSON frames on the Unix socket: 4-byte big-endian length, then UTF-8 JSON."""

from __future__ import annotations

import asyncio
import socket
import struct

from pydantic import BaseModel, ValidationError

from ringserve.errors import ProtocolError
from ringserve.ipc.messages import REPLY_ADAPTER, REQUEST_ADAPTER, Reply, Request

MAX_FRAME_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct(">I")


def encode(message: BaseModel) -> bytes:
    body = message.model_dump_json().encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


def _length(prefix: bytes) -> int:
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


def decode_request(body: bytes) -> Request:
    try:
        return REQUEST_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise ProtocolError(f"malformed request frame: {exc.errors()[0]['msg']}") from exc


def decode_reply(body: bytes) -> Reply:
    try:
        return REPLY_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise ProtocolError(f"malformed reply frame: {exc.errors()[0]['msg']}") from exc


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> bytes | None:
    """One frame's body from a blocking socket, or None when the peer closed cleanly."""
    prefix = _recv_exactly(sock, _LENGTH.size)
    if prefix is None:
        return None
    body = _recv_exactly(sock, _length(prefix))
    if body is None:
        raise ProtocolError("connection closed in the middle of a frame")
    return body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        prefix = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed in the middle of a frame") from exc
        return None
    try:
        return await reader.readexactly(_length(prefix))
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("connection closed in the middle of a frame") from exc
