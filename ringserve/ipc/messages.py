"""Every message between api.py and rank 0, defined once and imported by both sides."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingParams(Message):
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: tuple[str, ...] = ()
    # None: no log probabilities; N: each token's, with the N most likely alternatives.
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatTurn(Message):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class ChatRequest(Message):
    kind: Literal["chat"] = "chat"
    messages: tuple[ChatTurn, ...] = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()
    conversation_id: str | None = None


class CompletionRequest(Message):
    kind: Literal["completion"] = "completion"
    prompt: str
    sampling: SamplingParams = SamplingParams()
    conversation_id: str | None = None


class InfoRequest(Message):
    kind: Literal["info"] = "info"


class TelemetryRequest(Message):
    kind: Literal["telemetry"] = "telemetry"


Request = Annotated[
    ChatRequest | CompletionRequest | InfoRequest | TelemetryRequest, Field(discriminator="kind")
]
GenerationRequest = ChatRequest | CompletionRequest


class Start(Message):
    kind: Literal["start"] = "start"
    prompt_tokens: int
    cached_tokens: int = 0


class TokenLogprob(Message):
    """A generated token's log probability and the most likely tokens in its place."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class Delta(Message):
    kind: Literal["delta"] = "delta"
    text: str
    tokens: int
    # With logprobs asked for: the tokens generated since the last delta (text can lag its
    # tokens, held back by the detokenizer or a possible stop string).
    logprobs: tuple[TokenLogprob, ...] = ()


class Usage(Message):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class Timings(Message):
    queued_s: float
    first_token_s: float
    total_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


class Done(Message):
    kind: Literal["done"] = "done"
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timings: Timings


class Error(Message):
    kind: Literal["error"] = "error"
    status: int
    message: str
    code: str = "server_error"


class ClusterInfo(Message):
    kind: Literal["info"] = "info"
    model: str
    model_path: str
    ranks: int
    backend: str
    context_limit: int
    dtype: str
    parameters: int
    ready: bool
    reason: str | None = None
    queued: int = 0
    prefix_cache: dict[str, int] = Field(default_factory=dict)


class TelemetryReply(Message):
    kind: Literal["telemetry"] = "telemetry"
    ranks: tuple[dict[str, Any], ...]


Reply = Annotated[
    Start | Delta | Done | Error | ClusterInfo | TelemetryReply, Field(discriminator="kind")
]

REQUEST_ADAPTER: TypeAdapter[Request] = TypeAdapter(Request)
REPLY_ADAPTER: TypeAdapter[Reply] = TypeAdapter(Reply)
