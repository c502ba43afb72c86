"""What rank 0's socket threads may ask of the engine: info, telemetry and new requests."""

from __future__ import annotations

import json
import queue

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
                "queued": self.leader.waiting,
                "running": len(self.leader.answers),
                "prefix_cache": self.prefix_cache.stats(),
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

    def count(self, request: CountRequest) -> TokenCount:
        return TokenCount(tokens=len(self.prompts.tokens(request.request)))

    def submit(self, request: GenerationRequest) -> PreparedRequest:
        prepared = self.prompts.prepare(request)
        try:
            self.leader.submit(prepared)
        except queue.Full:
            raise GenerationError(
                f"the request queue is full ({self.leader.queue_size} waiting); retry later",
                429,
                "queue_full",
            ) from None
        prepared.reply(Start(prompt_tokens=len(prepared.tokens), prompt_text=prepared.prompt_text))
        return prepared
