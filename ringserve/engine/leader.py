"""Rank 0's half of the loop: it alone reads requests, decides each op and streams replies."""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from ringserve.distributed.ops import GenerateOp
from ringserve.distributed.protocol import FinishCode, Header, Op
from ringserve.engine.detokenize import ExactDetokenizers
from ringserve.engine.logprobs import token_logprob
from ringserve.engine.requests import PreparedRequest
from ringserve.engine.stops import StopMatcher
from ringserve.ipc.messages import Delta, Done, Error, Timings, TokenLogprob, Usage

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishCode.STOP: "stop",
    FinishCode.LENGTH: "length",
    FinishCode.CANCELLED: "cancelled",
}


class Health:
    """Whether every rank answers, as rank 0 sees it: no wait on the other ranks has lasted too
    long, and no collective has failed. Read by the socket threads, written by the loop.

    Two waits are timed. A header exchange should take no time beyond the slowest rank's
    arrival, so `heartbeat_timeout` bounds it. A model step (one decode step, or one prefill
    chunk) takes as long as the model needs, which may be seconds for a big model on CPUs, so
    it gets the larger `step_timeout`: a rank that hangs inside the model's own collectives is
    reported then, and a slow step is never taken for a silent rank."""

    def __init__(self, heartbeat_timeout: float, step_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.step_timeout = step_timeout
        self._lock = threading.Lock()
        self._wait: tuple[float, float, str] | None = None  # since, limit, what is awaited
        self._broken: str | None = None
        self.loaded = False

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        with self._timed(self.heartbeat_timeout, "a rank has not answered"):
            yield

    @contextlib.contextmanager
    def model_step(self) -> Iterator[None]:
        with self._timed(self.step_timeout, "a model step has not finished"):
            yield

    def progress(self) -> None:
        """The step in progress moved on (a prefill chunk is done): time it afresh."""
        with self._lock:
            if self._wait is not None:
                self._wait = (time.monotonic(), *self._wait[1:])

    @contextlib.contextmanager
    def _timed(self, limit: float, what: str) -> Iterator[None]:
        with self._lock:
            self._wait = (time.monotonic(), limit, what)
        try:
            yield
        finally:
            with self._lock:
                self._wait = None

    def mark_broken(self, reason: str) -> None:
        with self._lock:
            self._broken = reason

    def problem(self) -> str | None:
        with self._lock:
            if self._broken:
                return self._broken
            if not self.loaded:
                return "the model is still loading"
            wait = self._wait
        if wait is not None:
            since, limit, what = wait
            waited = time.monotonic() - since
            if waited > limit:
                return f"{what} for {waited:.1f} s"
        return None


@dataclass
class ActiveRequest:
    request: PreparedRequest
    detokenizer: StreamingDetokenizer
    stops: StopMatcher
    cached_tokens: int = 0
    admitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    completion_tokens: int = 0
    finish: FinishCode | None = None
    # Log probabilities of tokens whose text has not gone out yet (held back by the stop
    # matcher or the detokenizer); they go out with the next text.
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    failure: str | None = None  # what failed on rank 0, when the request ends as failed


class Leader:
    """Decides the next op from the queue and the active request; turns tokens into replies."""

    def __init__(self, tokenizer: TokenizerWrapper, queue_size: int, health: Health) -> None:
        self.tokenizer = tokenizer
        self.pending: queue.Queue[PreparedRequest] = queue.Queue(maxsize=queue_size)
        self.health = health
        self.active: ActiveRequest | None = None
        self.telemetry = TelemetryBoard()
        self.detokenizers = ExactDetokenizers(tokenizer)
        self._ids = itertools.count(1)

    def submit(self, request: PreparedRequest) -> None:
        """Queue a request; raises queue.Full when the queue is at its limit."""
        request.request_id = next(self._ids)
        self.pending.put_nowait(request)

    def next_op(self) -> tuple[Header, bytes, PreparedRequest | None]:
        active = self.active
        if active is not None:
            if active.request.cancelled.is_set() and active.finish is None:
                active.finish = FinishCode.CANCELLED
            if active.finish is not None:
                finish = Header(Op.FINISH, request_id=active.request.request_id, code=active.finish)
                return finish, b"", None
            return Header(Op.STEP, request_id=active.request.request_id), b"", None
        if self.telemetry.wanted.is_set():
            return Header(Op.TELEMETRY), b"", None
        while True:
            try:
                request = self.pending.get_nowait()
            except queue.Empty:
                return Header(Op.IDLE), b"", None
            if request.cancelled.is_set():
                request.close()
                continue
            payload = (
                GenerateOp(
                    request_id=request.request_id,
                    tokens=tuple(request.tokens),
                    sampling=request.sampling,
                    seed=request.seed,
                    max_tokens=request.max_tokens,
                    conversation_id=request.conversation_id,
                    cache_scope=request.cache_scope,
                )
                .model_dump_json()
                .encode()
            )
            header = Header(Op.GENERATE, length=len(payload), request_id=request.request_id)
            return header, payload, request

    def admitted(self, request: PreparedRequest) -> None:
        detokenizer = self.detokenizers.fresh()
        stops = StopMatcher(request.sampling.stop)
        self.active = ActiveRequest(request, detokenizer, stops)

    def reused(self, cached_tokens: int) -> None:
        """The prefix cache supplied the first `cached_tokens` of the active request's prompt."""
        assert self.active is not None
        self.active.cached_tokens = cached_tokens

    def failed(self, exc: Exception) -> None:
        """Rank 0 failed acting on the active request: end it as failed (the other ranks learn
        of it in the next exchange)."""
        if self.active is not None and self.active.finish is None:
            self.active.finish = FinishCode.FAILED
            self.active.failure = f"{type(exc).__name__}: {exc}"

    def on_token(self, token: int, logprobs: mx.array | None = None) -> None:
        active = self.active
        assert active is not None
        if active.first_token_at is None:
            active.first_token_at = time.monotonic()
        if token in self.tokenizer.eos_token_ids:
            active.finish = FinishCode.STOP
            return
        active.completion_tokens += 1
        top = active.request.sampling.logprobs
        if top is not None and logprobs is not None:
            active.unsent_logprobs.append(token_logprob(self.tokenizer, token, logprobs, top))
        active.detokenizer.add_token(token)
        text = active.stops.feed(active.detokenizer.last_segment)
        if text:
            active.request.reply(self._delta(active, text))
        if active.stops.matched:
            active.finish = FinishCode.STOP
        elif active.completion_tokens >= active.request.max_tokens:
            active.finish = FinishCode.LENGTH

    def finished(self, code: FinishCode) -> None:
        active = self.active
        assert active is not None
        self.active = None
        request = active.request
        try:
            if code is FinishCode.FAILED:
                request.reply(failure_reply(active.failure))
            else:
                request.reply(self._done(active, code))
        except Exception as exc:
            log.exception("request %d: the answer's end failed", request.request_id)
            request.reply(failure_reply(f"{type(exc).__name__}: {exc}"))
        finally:
            request.close()

    def _done(self, active: ActiveRequest, code: FinishCode) -> Done:
        """The rest of the answer's text goes out; then its end, with usage and timings."""
        request = active.request
        if code is not FinishCode.CANCELLED and not active.stops.matched:
            active.detokenizer.finalize()
            tail = active.stops.feed(active.detokenizer.last_segment)
            tail += active.stops.flush()
            if tail or active.unsent_logprobs:
                request.reply(self._delta(active, tail))
        now = time.monotonic()
        first = active.first_token_at or now
        decode_s = now - first
        usage = Usage(
            prompt_tokens=len(request.tokens),
            completion_tokens=active.completion_tokens,
            cached_tokens=active.cached_tokens,
        )
        timings = Timings(
            queued_s=active.admitted_at - request.received_at,
            first_token_s=first - active.admitted_at,
            total_s=now - request.received_at,
            prefill_tokens_per_s=(len(request.tokens) - active.cached_tokens)
            / max(first - active.admitted_at, 1e-9),
            decode_tokens_per_s=max(active.completion_tokens - 1, 0) / decode_s
            if decode_s > 0
            else 0.0,
        )
        reason = FINISH_REASONS.get(code, "stop")
        log.info(
            "request %d %s: %d prompt tokens (%d cached) + %d generated; queued %.1f ms, "
            "first token %.1f ms, %.1f tokens/s",
            request.request_id,
            reason,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            1000 * timings.queued_s,
            1000 * timings.first_token_s,
            timings.decode_tokens_per_s,
        )
        return Done(finish_reason=reason, usage=usage, timings=timings)  # type: ignore[arg-type]

    @staticmethod
    def _delta(active: ActiveRequest, text: str) -> Delta:
        logprobs = tuple(active.unsent_logprobs)
        active.unsent_logprobs.clear()
        return Delta(text=text, tokens=active.completion_tokens, logprobs=logprobs)

    def deliver_telemetry(self, reports: list[bytes]) -> None:
        self.telemetry.deliver(reports)

    def fail_all(self, status: int, message: str) -> None:
        """Answer the active and every queued request with an error (the ring is gone)."""
        error = Error(status=status, message=message, code="ranks_unavailable")
        if self.active is not None:
            self.active.request.reply(error)
            self.active.request.close()
            self.active = None
        while True:
            try:
                request = self.pending.get_nowait()
            except queue.Empty:
                return
            request.reply(error)
            request.close()


def failure_reply(failure: str | None) -> Error:
    where = f" on rank 0 ({failure})" if failure else " on another rank (see the ranks' logs)"
    log.warning("a request failed%s", where)
    return Error(
        status=500,
        message=f"generating this answer failed{where}; the server goes on serving",
        code="generation_failed",
    )


class TelemetryBoard:
    """Hands a telemetry gather from the loop to the socket threads that asked for it."""

    def __init__(self) -> None:
        self.wanted = threading.Event()
        self._ready = threading.Condition()
        self._generation = 0
        self._reports: list[bytes] = []

    def request(self, timeout: float) -> list[bytes] | None:
        with self._ready:
            seen = self._generation
            self.wanted.set()
            if not self._ready.wait_for(lambda: self._generation != seen, timeout=timeout):
                return None
            return list(self._reports)

    def deliver(self, reports: list[bytes]) -> None:
        with self._ready:
            self.wanted.clear()
            self._reports = reports
            self._generation += 1
            self._ready.notify_all()
