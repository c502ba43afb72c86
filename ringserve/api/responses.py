"""OpenAI response bodies from rank 0's replies: whole answers, or server-sent event streams.

A request for several choices (`n`, and the prompts of a legacy completion) is served as one
socket request per choice, all at once: rank 0 generates them together in its batch. The
request's timeout covers all of its choices.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ringserve.api.errors import error_body
from ringserve.api.schemas import usage_body
from ringserve.api.stream import (
    DISCONNECT_POLL_S,
    KEEPALIVE_S,
    Deadline,
    Gone,
    HeldRequest,
    Idle,
    RingLink,
    Started,
    Watch,
    open_started,
    replies,
)
from ringserve.errors import GenerationError
from ringserve.ipc.messages import (
    CalledTool,
    Delta,
    Done,
    GenerationRequest,
    Start,
    TokenLogprob,
)

log = logging.getLogger(__name__)


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
        reasoning: str = "",
        calls: Sequence[CalledTool] = (),
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if calls and not text else text,
            }
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [_tool_call(call) for call in calls]
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
        reasoning: str = "",
        calls: Sequence[CalledTool] = (),
    ) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if reasoning:
                delta["reasoning_content"] = reasoning
            if calls:
                delta["tool_calls"] = [{"index": call.index, **_tool_call(call)} for call in calls]
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
            "top_logprobs": [None if e.logprob is None else _by_text(e.top) for e in entries],
            "text_offset": offsets[:-1],
        }


CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)
TEXT = Shape("text_completion", "text_completion", "cmpl", chat=False)


def _tool_call(call: CalledTool) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _by_text(top: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The legacy alternatives, keyed by text: of two tokens that decode alike, the likelier."""
    by_text: dict[str, float] = {}
    for token, logprob in top:
        by_text.setdefault(token, logprob)
    return by_text


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    def described(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    top = [described(token, logprob) for token, logprob in entry.top]
    return {**described(entry.token, entry.logprob), "top_logprobs": top}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_event(exc: GenerationError) -> str:
    return sse(error_body(str(exc), exc.status, exc.code))


def choice_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index` of a prompt: a client's seed moves on by one per choice, so that the
    choices differ and each is reproducible (without a seed, rank 0 draws one per request)."""
    seed = request.sampling.seed
    if index == 0 or seed is None:
        return request
    moved = (seed + index + 2**63) % 2**64 - 2**63  # stays a signed 64-bit seed
    sampling = request.sampling.model_copy(update={"seed": moved})
    return request.model_copy(update={"sampling": sampling})


@dataclass(frozen=True)
class Job:
    """One choice: its socket request, its index in the answer, and whether it is the first
    choice of its prompt (whose prompt tokens count in the usage)."""

    request: GenerationRequest
    index: int
    first_of_prompt: bool


def plan_jobs(prompts: Sequence[GenerationRequest], n: int) -> tuple[Job, ...]:
    """Every choice of every prompt; prompt p's choices are p*n .. p*n + n - 1, as OpenAI
    numbers them."""
    return tuple(
        Job(choice_request(request, i), p * n + i, i == 0)
        for p, request in enumerate(prompts)
        for i in range(n)
    )


@dataclass
class Totals:
    """Usage summed over the choices: each prompt counts once, the completions add up."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, done: Done, first_of_prompt: bool) -> None:
        if first_of_prompt:
            self.prompt_tokens += done.usage.prompt_tokens
            self.cached_tokens += done.usage.cached_tokens
        self.completion_tokens += done.usage.completion_tokens

    def body(self) -> dict[str, Any]:
        return usage_body(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


@dataclass(frozen=True)
class Answer:
    """Everything a response needs besides its first, already accepted, socket request."""

    link: RingLink
    shape: Shape
    meta: dict[str, Any]
    jobs: tuple[Job, ...]
    include_usage: bool
    wants_logprobs: bool
    deadline: Deadline
    gone: Gone | None = None  # whether the client left (a held request stops waiting)


async def open_all(answer: Answer, first: Started) -> list[Started]:
    """Every choice's socket request, accepted by rank 0 (the first one already is): they
    are generated together, in one batch. A refusal closes the ones opened and is raised."""
    started = [first]
    try:
        for job in answer.jobs[1:]:
            started.append(
                await open_started(answer.link, job.request, answer.deadline, answer.gone)
            )
    except BaseException:
        await close_all(started)
        raise
    return started


async def close_all(started: Sequence[Started]) -> None:
    for connection, _ in started:
        await connection.close()


async def collect_answer(http: Request, answer: Answer, first: Started) -> dict[str, Any]:
    """The whole answer: every choice, generated together, and the usage."""
    started = await open_all(answer, first)
    try:
        # A choice that fails cancels the others (their requests end on the ranks).
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_collect_choice(http, answer, connection, start, job.index))
                for job, (connection, start) in zip(answer.jobs, started, strict=True)
            ]
    except* Exception as failed:
        raise failed.exceptions[0] from None
    finally:
        await close_all(started)
    results = [task.result() for task in tasks]
    totals = Totals()
    for job, (_, done) in zip(answer.jobs, results, strict=True):
        totals.add(done, job.first_of_prompt)
    choices = [choice for choice, _ in results]
    usage = totals.body()
    return {**answer.meta, "object": answer.shape.object, "choices": choices, "usage": usage}


async def _collect_choice(
    http: Request, answer: Answer, connection: HeldRequest, start: Start, index: int
) -> tuple[dict[str, Any], Done]:
    """One whole choice, and the `done` reply that ended it."""
    text: list[str] = [start.prompt_text or ""]
    reasoning: list[str] = []
    calls: list[CalledTool] = []
    entries: list[TokenLogprob] = []
    watch = Watch(http.is_disconnected)
    async for reply in replies(connection, answer.deadline, DISCONNECT_POLL_S):
        await watch.check()
        if isinstance(reply, Delta):
            text.append(reply.text)
            reasoning.append(reply.reasoning)
            calls.extend(reply.tool_calls)
            entries.extend(reply.logprobs)
        elif isinstance(reply, Done):
            logprobs = answer.shape.logprobs(entries) if answer.wants_logprobs else None
            choice = answer.shape.choice(
                index, "".join(text), reply.finish_reason, logprobs, "".join(reasoning), calls
            )
            return choice, reply
    raise AssertionError("replies end with done")


@dataclass(frozen=True)
class _ChoiceEvent:
    text: str  # a server-sent event
    done: Done | None = None  # the reply that ended the choice
    failed: bool = False  # the choice ended with this error event


def _failure(exc: GenerationError) -> _ChoiceEvent:
    return _ChoiceEvent(error_event(exc), failed=True)


async def stream_answer(answer: Answer, first: Started) -> AsyncIterator[str]:
    """Every choice's chunks as they come (choices are generated together and tell themselves
    apart by `index`), then the usage chunk if asked for, then `[DONE]`. A failure, whatever
    it is, ends the stream with an error event."""
    started = [first]
    pumps: list[asyncio.Task[None]] = []
    try:
        started = await open_all(answer, first)
        chunk = {**answer.meta, "object": answer.shape.chunk_object}
        events: asyncio.Queue[tuple[Job, _ChoiceEvent]] = asyncio.Queue()

        async def pump(job: Job, choice: Started) -> None:
            try:
                async for event in _choice_events(answer, chunk, choice, job.index):
                    await events.put((job, event))
            except Exception as exc:  # whatever it is, the answer ends with it, not hanging
                log.exception("a streamed choice failed")
                failure = GenerationError(f"internal error ({type(exc).__name__})", 500)
                await events.put((job, _failure(failure)))

        pumps = [
            asyncio.create_task(pump(job, choice))
            for job, choice in zip(answer.jobs, started, strict=True)
        ]
        totals, ended = Totals(), 0
        while ended < len(pumps):
            job, event = await events.get()
            yield event.text
            if event.failed:
                return  # one choice failed: the answer ends with its error
            if event.done is not None:
                totals.add(event.done, job.first_of_prompt)
                ended += 1
        if answer.include_usage:
            yield sse({**chunk, "choices": [], "usage": totals.body()})
        yield sse("[DONE]")
    except GenerationError as exc:
        yield error_event(exc)
    except Exception as exc:
        log.exception("a streamed answer failed")
        yield error_event(GenerationError(f"internal error ({type(exc).__name__})", 500))
    finally:
        for task in pumps:
            task.cancel()
        await close_all(started)


async def _choice_events(
    answer: Answer, chunk: dict[str, Any], started: Started, index: int
) -> AsyncIterator[_ChoiceEvent]:
    """One choice's events, ending with its finish chunk (with its `done` reply), or with an
    error event."""
    shape = answer.shape
    connection, start = started
    offset = 0  # characters of the completion's tokens sent so far (the legacy text_offset)

    def event(choice: dict[str, Any]) -> _ChoiceEvent:
        return _ChoiceEvent(sse({**chunk, "choices": [choice]}))

    if shape.chat:
        yield event(shape.chunk_choice(index, "", None, first=True))
    if start.prompt_text:
        yield event(shape.chunk_choice(index, start.prompt_text, None))
    try:
        async for reply in replies(connection, answer.deadline, KEEPALIVE_S):
            if isinstance(reply, Idle):
                yield _ChoiceEvent(": keep-alive\n\n")
            elif isinstance(reply, Delta):
                logprobs = shape.logprobs(reply.logprobs, offset) if answer.wants_logprobs else None
                offset += sum(len(entry.token) for entry in reply.logprobs)
                calls = reply.tool_calls
                text = None if not reply.text and (reply.reasoning or calls) else reply.text
                choice = shape.chunk_choice(
                    index, text, None, False, logprobs, reply.reasoning, calls
                )
                yield event(choice)
            elif isinstance(reply, Done):
                finish = shape.chunk_choice(index, None, reply.finish_reason)
                yield _ChoiceEvent(sse({**chunk, "choices": [finish]}), reply)
    except GenerationError as exc:
        yield _failure(exc)
