"""The socket's messages survive framing both ways, and malformed frames are refused."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ringserve.errors import ProtocolError
from ringserve.ipc.framing import decode_reply, decode_request, encode, read_frame, recv_frame
from ringserve.ipc.messages import (
    ChatRequest,
    ChatTurn,
    Delta,
    Done,
    Error,
    SamplingParams,
    Start,
    Timings,
    Usage,
)


def test_requests_and_replies_round_trip_through_frames() -> None:
    request = ChatRequest(
        messages=(ChatTurn(role="user", content="héllo 🚀" * 1000),),
        sampling=SamplingParams(temperature=0.5, stop=("END",), logit_bias={5: -1.0}),
        conversation_id="c1",
    )
    replies = [
        Start(prompt_tokens=3),
        Delta(text="日本", tokens=1),
        Done(
            finish_reason="length",
            usage=Usage(prompt_tokens=3, completion_tokens=1, cached_tokens=2),
            timings=Timings(
                queued_s=0,
                first_token_s=0.1,
                total_s=0.2,
                prefill_tokens_per_s=1,
                decode_tokens_per_s=2,
            ),
        ),
        Error(status=429, message="full", code="queue_full"),
    ]
    left, right = socket.socketpair()
    with left, right:
        left.sendall(encode(request))
        body = recv_frame(right)
        assert body is not None and decode_request(body) == request
        for reply in replies:
            right.sendall(encode(reply))
            body = recv_frame(left)
            assert body is not None and decode_reply(body) == reply
        right.close()
        assert recv_frame(left) is None


def test_the_async_reader_sees_the_same_frames() -> None:
    async def story() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(encode(Start(prompt_tokens=7)) + encode(Delta(text="x", tokens=1)))
        reader.feed_eof()
        first, second = await read_frame(reader), await read_frame(reader)
        assert first is not None and decode_reply(first) == Start(prompt_tokens=7)
        assert second is not None and decode_reply(second) == Delta(text="x", tokens=1)
        assert await read_frame(reader) is None

    asyncio.run(story())


def test_malformed_and_truncated_frames_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        decode_request(b'{"kind": "chat", "messages": []}')
    with pytest.raises(ProtocolError):
        decode_request(b'{"kind": "nope"}')
    left, right = socket.socketpair()
    with left, right:
        left.sendall(encode(Start(prompt_tokens=1))[:-2])
        left.close()
        with pytest.raises(ProtocolError):
            recv_frame(right)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_reply(b'{"kind": "start", "prompt_tokens": 1, "surprise": true}')
