"""One request's answer on rank 0: its tokens turned into text (detokenized, held back at a
possible stop string), log probabilities (of its echoed prompt too), the finish it calls for,
and its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from ringserve.distributed.protocol import FinishCode
from ringserve.engine.logprobs import prompt_logprobs, token_logprob
from ringserve.engine.prompt_scores import PromptScores
from ringserve.engine.requests import PreparedRequest
from ringserve.engine.splitter import AnswerSplitter, Parts
from ringserve.engine.stops import StopMatcher
from ringserve.ipc.messages import Delta, Done, Error, Timings, TokenLogprob, Usage

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishCode.STOP: "stop",
    FinishCode.LENGTH: "length",
    FinishCode.CANCELLED: "cancelled",
}


@dataclass
class Answer:
    request: PreparedRequest
    detokenizer: StreamingDetokenizer
    stops: StopMatcher
    parts: AnswerSplitter
    cached_tokens: int = 0
    admitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    completion_tokens: int = 0
    finish: FinishCode | None = None  # decided; the sequence leaves the batch in the next tick
    failure: str | None = None  # what failed on rank 0, when it ends as failed
    # Log probabilities of tokens whose text has not gone out yet (held back by the stop
    # matcher or the detokenizer); they go out with the next text.
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    called_tools: bool = False  # a whole tool call went out

    def scored(self, texts: Sequence[str], scores: PromptScores) -> None:
        """A chunk of the echoed prompt scored: its entries go out, the first chunk's with the
        prompt's text, before any of the answer (the batch gives a sequence no token before
        its prompt is scored to its end). A reply a chunk keeps each frame small, however long
        the prompt."""
        if self.finish is not None:
            return
        text = (self.request.prompt_text or "") if scores.start == 1 else ""
        entries = tuple(prompt_logprobs(texts, self.request.tokens, scores))
        self.request.reply(Delta(text=text, tokens=0, logprobs=entries))

    def take(self, tokenizer: TokenizerWrapper, token: int, logprobs: mx.array) -> None:
        """A token the sequence took: reply with the text it completes, decide a finish."""
        if self.finish is not None:
            return  # decided already; the removal is on its way
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.request.max_tokens == 0:  # the echoed prompt alone: the token is not the answer's
            self.finish = FinishCode.LENGTH
            return
        if token in tokenizer.eos_token_ids:
            self.finish = FinishCode.STOP
            return
        self.completion_tokens += 1
        top = self.request.sampling.logprobs
        if top is not None:
            self.unsent_logprobs.append(token_logprob(tokenizer, token, logprobs, top))
        self.detokenizer.add_token(token)
        for parts in self.parts.feed(self.stops.feed(self.detokenizer.last_segment)):
            self.request.reply(self._delta(parts))
        if self.stops.matched:
            self.finish = FinishCode.STOP
        elif self.completion_tokens >= self.request.max_tokens:
            self.finish = FinishCode.LENGTH

    def fail(self, failure: str | None) -> None:
        if self.finish is None:
            self.finish = FinishCode.FAILED
        self.failure = self.failure or failure

    def end(self, code: FinishCode) -> None:
        """The last reply, then the stream's close: the rest of the text with its usage and
        timings, or the error a failed request ends with."""
        request = self.request
        try:
            if code is FinishCode.FAILED:
                request.reply(failure_reply(self.failure))
            else:
                request.reply(self._done(code))
        except Exception as exc:
            log.exception("request %d: the answer's end failed", request.request_id)
            request.reply(failure_reply(f"{type(exc).__name__}: {exc}"))
        finally:
            request.close()

    def _done(self, code: FinishCode) -> Done:
        request = self.request
        if code is not FinishCode.CANCELLED:
            tail: list[Parts] = []
            if not self.stops.matched:
                self.detokenizer.finalize()
                text = self.stops.feed(self.detokenizer.last_segment) + self.stops.flush()
                tail += self.parts.feed(text)
            last = self.parts.finish(cut=code is FinishCode.LENGTH)
            if tail:
                tail[-1].add(last)  # it goes on where the last part ends
            else:
                tail = [last]
            for parts in tail:
                if parts or self.unsent_logprobs:
                    request.reply(self._delta(parts))
        now = time.monotonic()
        first = self.first_token_at or now
        decode_s = now - first
        usage = Usage(
            prompt_tokens=len(request.tokens),
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
        )
        timings = Timings(
            queued_s=self.admitted_at - request.received_at,
            first_token_s=first - self.admitted_at,
            total_s=now - request.received_at,
            prefill_tokens_per_s=(len(request.tokens) - self.cached_tokens)
            / max(first - self.admitted_at, 1e-9),
            decode_tokens_per_s=max(self.completion_tokens - 1, 0) / decode_s
            if decode_s > 0
            else 0.0,
        )
        reason = FINISH_REASONS.get(code, "stop")
        if self.called_tools and code is FinishCode.STOP:
            reason = "tool_calls"
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
        return Done(
            finish_reason=reason,  # type: ignore[arg-type]
            usage=usage,
            timings=timings,
            stop_sequence=self.stops.matched,
        )

    def _delta(self, parts: Parts) -> Delta:
        logprobs = tuple(self.unsent_logprobs)
        self.unsent_logprobs.clear()
        self.called_tools = self.called_tools or any(piece.whole for piece in parts.calls)
        return Delta(
            text=parts.content,
            tokens=self.completion_tokens,
            logprobs=logprobs,
            reasoning=parts.reasoning,
            tool_calls=tuple(parts.calls),
        )


def failure_reply(failure: str | None) -> Error:
    """`failure`: what went wrong, as rank 0 knows it (None: another rank failed)."""
    why = failure or "another rank failed (see the ranks' logs)"
    log.warning("a request failed: %s", why)
    return Error(
        status=500,
        message=f"generating this answer failed: {why}; the server goes on serving",
        code="generation_failed",
    )
