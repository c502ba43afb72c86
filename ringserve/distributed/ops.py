"""Payloads that rank 0 broadcasts after a header (JSON bytes, validated on every rank)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ringserve.ipc.messages import SamplingParams


class GenerateOp(BaseModel):
    """Everything a rank needs to start a request in lockstep with the others."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: int
    tokens: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    max_tokens: int
    conversation_id: str | None = None
    cache_scope: str = ""
