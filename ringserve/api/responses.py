"""OpenAI response bodies from rank 0's replies: whole answers, or server-sent event streams.

A request for several choices (`n`, and the prompts of a legacy completion) is served as one
socket request per choice, all at once: rank 0 generates them together in its batch. The
request's timeout covers all of its choices.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ringserve.api.calls import Call, Calls, openai_piece
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
    ClusterInfo,
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
        calls: Sequence[Call] = (),
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if calls and not text else text,
            }
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [call.openai() for call in calls]
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
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
        delta: dict[str, Any] | None = None,
        text: str = "",
    ) -> dict[str, Any]:
        """A chunk's choice: chat's `delta` (empty: none), or a completion's `text`."""
        if self.chat:
            return {
                "index": index,
                "delta": delta or {},
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

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


# A chat stream's first delta: the role, and the content that begins (empty for now).
OPENING = {"role": "assistant", "content": ""}


def chat_deltas(reply: Delta) -> list[dict[str, Any]]:
    """A reply's deltas, as OpenAI streams them: its text, then each piece of a call in a
    delta of its own."""
    deltas: list[dict[str, Any]] = []
    if reply.text or reply.reasoning:
        text = {"content": reply.text} if reply.text else {}
        reasoning = {"reasoning_content": reply.reasoning} if reply.reasoning else {}
        deltas.append({**text, **reasoning})
    entries = (openai_piece(piece) for piece in reply.tool_calls)
    deltas += [{"tool_calls": [entry]} for entry in entries if entry is not None]
    return deltas


def opens_with_call(deltas: list[dict[str, Any]]) -> bool:
    """Whether the first delta opens the stream: when the answer opens with a call, its first
    piece comes with the role and no content, as OpenAI streams it (an answer that is only
    calls has no content, streamed or not)."""
    calls = deltas[0].get("tool_calls") if deltas else None
    if not calls or "id" not in calls[0]:
        return False
    deltas[0] = {"role": "assistant", "content": None, **deltas[0]}
    return True


def system_fingerprint(info: ClusterInfo) -> str:
    """What OpenAI calls the system fingerprint: it changes when the serving configuration
    does (the model and its precision, the ranks and how the model is split across them)."""
    served = info.model_dump(
        include={"model", "model_path", "quantization", "dtype", "ranks", "backend", "parallel"}
    )
    served["split"] = [share.layers for share in info.split]
    digest = hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()
    return f"fp_{digest[:10]}"


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
    calls = Calls()
    entries: list[TokenLogprob] = []
    watch = Watch(http.is_disconnected)
    async for reply in replies(connection, answer.deadline, DISCONNECT_POLL_S):
        await watch.check()
        if isinstance(reply, Delta):
            text.append(reply.text)
            reasoning.append(reply.reasoning)
            for piece in reply.tool_calls:
                calls.add(piece)
            entries.extend(reply.logprobs)
        elif isinstance(reply, Done):
            logprobs = answer.shape.logprobs(entries) if answer.wants_logprobs else None
            choice = answer.shape.choice(
                index,
                "".join(text),
                reply.finish_reason,
                logprobs,
                "".join(reasoning),
                calls.whole(),
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
        if answer.include_usage:  # every chunk has it, null but in the last
            chunk["usage"] = None
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

    opening = shape.chat  # the role is still to go out: with the first text or call
    if start.prompt_text:
        yield event(shape.chunk_choice(index, text=start.prompt_text))
    try:
        async for reply in replies(connection, answer.deadline, KEEPALIVE_S):
            if isinstance(reply, Idle):
                yield _ChoiceEvent(": keep-alive\n\n")
            elif isinstance(reply, Delta):
                logprobs = shape.logprobs(reply.logprobs, offset) if answer.wants_logprobs else None
                offset += sum(len(entry.token) for entry in reply.logprobs)
                if not shape.chat:
                    yield event(shape.chunk_choice(index, None, logprobs, text=reply.text))
                    continue
                deltas = chat_deltas(reply)
                if logprobs is not None and not deltas:
                    deltas = [{}]  # tokens whose text was held back, then dropped
                if opening and not opens_with_call(deltas):
                    yield event(shape.chunk_choice(index, delta=dict(OPENING)))
                opening = False
                for i, delta in enumerate(deltas):
                    choice = shape.chunk_choice(index, None, logprobs if i == 0 else None, delta)
                    yield event(choice)
            elif isinstance(reply, Done):
                if opening:
                    yield event(shape.chunk_choice(index, delta=dict(OPENING)))
                finish = shape.chunk_choice(index, reply.finish_reason)
                yield _ChoiceEvent(sse({**chunk, "choices": [finish]}), reply)
    except GenerationError as exc:
        yield _failure(exc)
