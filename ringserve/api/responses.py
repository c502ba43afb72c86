"""OpenAI response bodies from rank 0's replies: whole answers, or server-sent event streams.

A request for `n` choices is served as `n` generations one after another (the ranks decode one
request at a time); each is its own socket request, and the prefix cache makes every choice
after the first prefill only its last prompt token.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ringserve.api.schemas import error_body, usage_body
from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.client import RankClient, RankConnection
from ringserve.ipc.messages import Delta, Done, Error, GenerationRequest, Start, TokenLogprob

KEEPALIVE_S = 5.0


@dataclass(frozen=True)
class Shape:
    """How one endpoint names its objects: chat completions or text completions."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def choice(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {
                "index": index,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

    def chunk_choice(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        first: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {
                "index": index,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        return {
            "index": index,
            "text": text or "",
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        }

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """The `logprobs` of a choice: chat's list of entries, or the legacy endpoint's columns
        (`offset`: characters of the completion before these tokens)."""
        if self.chat:
            return {"content": [_chat_logprob(entry) for entry in entries]}
        offsets = list(itertools.accumulate((len(e.token) for e in entries), initial=offset))
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_by_text(e.top) for e in entries],
            "text_offset": offsets[:-1],
        }


CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)
TEXT = Shape("text_completion", "text_completion", "cmpl", chat=False)


def _by_text(top: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The legacy alternatives, keyed by text: of two tokens that decode alike, the likelier."""
    by_text: dict[str, float] = {}
    for token, logprob in top:
        by_text.setdefault(token, logprob)
    return by_text


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    def described(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    top = [described(token, logprob) for token, logprob in entry.top]
    return {**described(entry.token, entry.logprob), "top_logprobs": top}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def choice_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index` of a request: a client's seed moves on by one per choice, so that the
    choices differ and each is reproducible (without a seed, rank 0 draws one per request)."""
    seed = request.sampling.seed
    if index == 0 or seed is None:
        return request
    sampling = request.sampling.model_copy(update={"seed": (seed + index) % 2**63})
    return request.model_copy(update={"sampling": sampling})


@dataclass
class Totals:
    """Usage summed over the choices: the prompt counts once, the completions add up."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    choices: int = 0

    def add(self, done: Done) -> None:
        if self.choices == 0:
            self.prompt_tokens = done.usage.prompt_tokens
            self.cached_tokens = done.usage.cached_tokens
        self.completion_tokens += done.usage.completion_tokens
        self.choices += 1

    def body(self) -> dict[str, Any]:
        return usage_body(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


async def open_started(
    client: RankClient, request: GenerationRequest, timeout: float
) -> RankConnection:
    """A socket request that rank 0 accepted (its `start` reply read), or the error it gave."""
    connection = await client.open(request)
    try:
        first = await _next_reply(connection, timeout)
        if not isinstance(first, Start):
            raise _unexpected(first)
    except BaseException:
        await connection.close()
        raise
    return connection


async def _next_reply(connection: RankConnection, timeout: float) -> Any:
    try:
        reply = await connection.next(timeout)
    except TimeoutError as exc:
        raise GenerationError(f"no answer within {timeout:.0f} s", 504, "timeout") from exc
    except ProtocolError as exc:
        raise GenerationError(str(exc), 502, "bad_reply") from exc
    if reply is None:
        raise GenerationError("rank 0 closed the stream early", 503, "ranks_unavailable")
    return reply


def _unexpected(reply: Any) -> GenerationError:
    if isinstance(reply, Error):
        return GenerationError(reply.message, reply.status, reply.code)
    return GenerationError(f"unexpected reply {reply.kind!r} from rank 0", 502, "bad_reply")


async def collect_choice(
    http: Request,
    connection: RankConnection,
    shape: Shape,
    index: int,
    wants_logprobs: bool,
    timeout: float,
    echoed: str = "",
) -> tuple[dict[str, Any], Done]:
    """One whole choice (its text after `echoed`), and the `done` reply that ended it."""
    deadline = time.monotonic() + timeout
    text: list[str] = [echoed]
    entries: list[TokenLogprob] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GenerationError(f"the request took longer than {timeout:.0f} s", 504, "timeout")
        try:
            reply = await connection.next(min(1.0, remaining))
        except TimeoutError:
            if await http.is_disconnected():
                raise GenerationError("client disconnected", 499, "client_closed") from None
            continue
        if reply is None:
            raise GenerationError("rank 0 closed the stream early", 503, "ranks_unavailable")
        if isinstance(reply, Delta):
            text.append(reply.text)
            entries.extend(reply.logprobs)
        elif isinstance(reply, Done):
            logprobs = shape.logprobs(entries) if wants_logprobs else None
            return shape.choice(index, "".join(text), reply.finish_reason, logprobs), reply
        else:
            raise _unexpected(reply)


@dataclass(frozen=True)
class StreamPlan:
    """What a streamed answer needs besides its first, already accepted, socket request."""

    client: RankClient
    request: GenerationRequest
    shape: Shape
    meta: dict[str, Any]
    choices: int
    include_usage: bool
    wants_logprobs: bool
    timeout: float
    echoed: str = ""  # text each choice starts with (the prompt, for the legacy `echo`)


async def stream_choices(plan: StreamPlan, first: RankConnection) -> AsyncIterator[str]:
    """Every choice's chunks in turn, then the usage chunk if asked for, then `[DONE]`; a
    failure ends the stream with an error event instead."""
    chunk = {**plan.meta, "object": plan.shape.chunk_object}
    totals = Totals()
    connection: RankConnection | None = first
    try:
        for index in range(plan.choices):
            if connection is None:
                try:
                    request = choice_request(plan.request, index)
                    connection = await open_started(plan.client, request, plan.timeout)
                except GenerationError as exc:
                    yield sse(error_body(str(exc), exc.status, exc.code))
                    return
            done: list[Done] = []
            async for event in _stream_choice(plan, chunk, connection, index, done):
                yield event
            await connection.close()
            connection = None
            if not done:  # the choice ended with an error event
                return
            totals.add(done[0])
        if plan.include_usage:
            yield sse({**chunk, "choices": [], "usage": totals.body()})
        yield sse("[DONE]")
    finally:
        if connection is not None:
            await connection.close()


async def _stream_choice(
    plan: StreamPlan,
    chunk: dict[str, Any],
    connection: RankConnection,
    index: int,
    done: list[Done],
) -> AsyncIterator[str]:
    """One choice's chunks, ending with its finish chunk (its `done` reply goes into `done`),
    or with an error event."""
    shape = plan.shape
    deadline = time.monotonic() + plan.timeout
    offset = 0  # characters of the completion's tokens sent so far (the legacy text_offset)
    if shape.chat:
        yield sse({**chunk, "choices": [shape.chunk_choice(index, "", None, first=True)]})
    if plan.echoed:
        yield sse({**chunk, "choices": [shape.chunk_choice(index, plan.echoed, None)]})
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = f"the request took longer than {plan.timeout:.0f} s"
            yield sse(error_body(message, 504, "timeout"))
            return
        try:
            reply = await connection.next(min(KEEPALIVE_S, remaining))
        except TimeoutError:
            yield ": keep-alive\n\n"
            continue
        if isinstance(reply, Delta):
            logprobs = shape.logprobs(reply.logprobs, offset) if plan.wants_logprobs else None
            offset += sum(len(entry.token) for entry in reply.logprobs)
            choice = shape.chunk_choice(index, reply.text, None, logprobs=logprobs)
            yield sse({**chunk, "choices": [choice]})
        elif isinstance(reply, Done):
            finish = shape.chunk_choice(index, None, reply.finish_reason)
            yield sse({**chunk, "choices": [finish]})
            done.append(reply)
            return
        else:
            message = reply.message if isinstance(reply, Error) else "rank 0 closed the stream"
            status = reply.status if isinstance(reply, Error) else 503
            yield sse(error_body(message, status, "generation_failed"))
            return
