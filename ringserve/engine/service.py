"""What rank 0's socket threads may ask of the engine: info, telemetry and new requests."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Iterator

from ringserve.engine.health import Health
from ringserve.engine.leader import Leader
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.engine.prompts import PromptBuilder
from ringserve.engine.requests import PreparedRequest
from ringserve.errors import GenerationError
from ringserve.ipc.messages import (
    ClusterInfo,
    CountRequest,
    GenerationRequest,
    Start,
    TelemetryReply,
    TokenCount,
)

TELEMETRY_TIMEOUT_S = 10.0
# Prompts are rendered and tokenized by one socket thread at a time: many large prompts at
# once queue for it rather than crowd out the loop every rank waits on.
PREPARERS = 1
PREPARE_WAIT_S = 30.0


class RankService:
    def __init__(
        self,
        facts: ClusterInfo,
        prompts: PromptBuilder,
        leader: Leader,
        health: Health,
        prefix_cache: PrefixCache,
    ) -> None:
        self.facts = facts
        self.prompts = prompts
        self.leader = leader
        self.health = health
        self.prefix_cache = prefix_cache
        self._preparing = threading.BoundedSemaphore(PREPARERS)

    def problem(self) -> str | None:
        return self.health.problem()

    def broken(self) -> bool:
        return self.health.broken

    def info(self) -> ClusterInfo:
        problem = self.problem()
        return self.facts.model_copy(
            update={
                "ready": problem is None,
                "reason": problem,
                "state": self.health.state(),
                "queued": self.leader.waiting,
                "running": len(self.leader.answers),
                "generated_tokens": self.leader.generated_tokens,
                "prefix_cache": {**self.prefix_cache.stats(), **self.prefix_cache.usage()},
            }
        )

    def telemetry(self) -> TelemetryReply:
        problem = self.problem()
        if problem is not None:
            raise GenerationError(problem, 503, "ranks_unavailable")
        reports = self.leader.telemetry.request(TELEMETRY_TIMEOUT_S)
        if reports is None:
            raise GenerationError("the ranks did not report telemetry in time", 504, "timeout")
        return TelemetryReply(ranks=tuple(json.loads(r) for r in reports))

    @contextlib.contextmanager
    def _preparer(self) -> Iterator[None]:
        if not self._preparing.acquire(timeout=PREPARE_WAIT_S):
            raise GenerationError(
                f"rank 0 has been preparing other prompts for {PREPARE_WAIT_S:.0f} s; retry later",
                503,
                "busy",
            )
        try:
            yield
        finally:
            self._preparing.release()

    def count(self, request: CountRequest) -> TokenCount:
        with self._preparer():
            tokens = self.prompts.tokens(request.request)
        limit = self.prompts.limits.context_limit
        if len(tokens) > limit:
            raise GenerationError(
                f"the prompt has {len(tokens)} tokens, but this model's context limit is "
                f"{limit} tokens",
                400,
                "context_length_exceeded",
            )
        return TokenCount(tokens=len(tokens))

    def submit(self, request: GenerationRequest) -> PreparedRequest:
        with self._preparer():
            prepared = self.prompts.prepare(request)
        try:
            self.leader.submit(prepared)
        except queue.Full:
            raise GenerationError(
                f"the request queue is full ({self.leader.queue_size} waiting); retry later",
                429,
                "queue_full",
            ) from None
        # An echoed prompt that is scored goes out with its scores (see Answer.scored).
        echoed = prepared.prompt_text if prepared.prompt_logprobs is None else None
        prepared.reply(Start(prompt_tokens=len(prepared.tokens), prompt_text=echoed))
        return prepared
