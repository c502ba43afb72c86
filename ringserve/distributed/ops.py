"""The payload of a tick: what rank 0 broadcasts when there is news (JSON bytes, validated on
every rank). Every rank applies it in the same order: telemetry, removals, admissions."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ringserve.distributed.protocol import FinishCode
from ringserve.ipc.bounds import TopLogprobs
from ringserve.ipc.messages import SamplingParams


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerateOp(Payload):
    """Everything a rank needs to start a request in lockstep with the others."""

    request_id: int
    tokens: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    max_tokens: int
    conversation_id: str | None = None
    cache_scope: str = ""
    grammar: str | None = None  # what decoding holds the answer to (llguidance's format)
    # None: the prompt is prefilled as usual; N: it is scored as it is prefilled, each token's
    # log probability and the N most likely in its place (see BatchEngine).
    prompt_logprobs: TopLogprobs | None = None


class Removal(Payload):
    """A sequence that leaves the batch, and why (rank 0 decided it)."""

    request_id: int
    code: FinishCode


class Tick(Payload):
    removals: tuple[Removal, ...] = ()
    admissions: tuple[GenerateOp, ...] = ()
    telemetry: bool = False  # gather every rank's report
    step: bool = False  # run one engine step (only a STEP op, which has no payload, does)


STEP_ONLY = Tick(step=True)
