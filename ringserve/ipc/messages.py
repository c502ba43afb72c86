"""Every message between api.py and rank 0, defined once and imported by both sides."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from ringserve.ipc.bounds import (
    MAX_ARGUMENT_VALUES,
    MAX_NESTING,
    EchoMaxTokens,
    JsonSchema,
    LogitBias,
    MinP,
    Penalty,
    RepetitionPenalty,
    Seed,
    StopStrings,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    too_deep,
)
from ringserve.ipc.json_shape import json_shape


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SamplingParams(Message):
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    seed: Seed | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = Field(default_factory=dict)
    max_tokens: EchoMaxTokens | None = None
    stop: StopStrings = ()
    # None: no log probabilities; N: each token's, with the N most likely alternatives.
    logprobs: TopLogprobs | None = None


def json_object_text(text: str) -> str:
    """`text` itself, if it is a JSON object (as a function call's arguments must be), weighed
    before it is parsed."""
    shape = json_shape(text.encode("utf-8", "surrogatepass"))
    if shape.depth > MAX_NESTING:
        raise ValueError(too_deep(MAX_NESTING))
    if shape.values > MAX_ARGUMENT_VALUES:
        raise ValueError(
            f"holds {shape.values} JSON values; a call's arguments may hold {MAX_ARGUMENT_VALUES}"
        )
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object as a string, got {text[:80]!r}")
    return text


class ToolCall(Message):
    """A function call an assistant turn made (history the client sends back)."""

    id: str
    name: str
    arguments: Annotated[str, AfterValidator(json_object_text)]


class ChatTurn(Message):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None  # an assistant turn's thinking, given back


# A variable given to the chat template: a plain value, nothing a template could run long on.
TemplateValue = str | int | float | bool | None


class Tool(Message):
    """A function the model may call: OpenAI's definition (`parameters` a JSON schema)."""

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: JsonSchema = Field(default_factory=lambda: {"type": "object"})

    def definition(self) -> dict[str, Any]:
        """As chat templates and the OpenAI API write it."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ResponseFormat(Message):
    """The JSON the answer must be: any object, or one `json_schema` accepts."""

    type: Literal["json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class Generating(Message):
    """What every generation request carries besides its prompt."""

    sampling: SamplingParams = SamplingParams()
    conversation_id: str | None = None
    # Whose prompt this is (derived from the API key): the prefix cache keeps scopes apart.
    cache_scope: str = ""
    # Who sent it (the API key's scope, without a cache salt): rank 0 shares the batch's free
    # places between clients, so one client's burst does not keep another's request waiting.
    client: str = ""
    # max_tokens as a ceiling (Anthropic's meaning): above the server's limit or the room the
    # context leaves, it is lowered to fit instead of refused.
    max_tokens_ceiling: bool = False


class ChatRequest(Generating):
    kind: Literal["chat"] = "chat"
    messages: tuple[ChatTurn, ...] = Field(min_length=1)
    tools: tuple[Tool, ...] = ()
    # none: tools are not offered; auto: the model decides; required: at least one call;
    # named: a call of `tool_name`. The last two are enforced while decoding.
    tool_choice: Literal["none", "auto", "required", "named"] = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, TemplateValue] = Field(default_factory=dict)


class CompletionRequest(Generating):
    kind: Literal["completion"] = "completion"
    prompt: str | tuple[int, ...]  # text, or token ids
    echo: bool = False  # start the answer with the prompt's text


class InfoRequest(Message):
    kind: Literal["info"] = "info"


class TelemetryRequest(Message):
    kind: Literal["telemetry"] = "telemetry"


class CountRequest(Message):
    """How many tokens a conversation's prompt takes (nothing is generated)."""

    kind: Literal["count"] = "count"
    request: ChatRequest


Request = Annotated[
    ChatRequest | CompletionRequest | InfoRequest | TelemetryRequest | CountRequest,
    Field(discriminator="kind"),
]
GenerationRequest = ChatRequest | CompletionRequest


class Start(Message):
    kind: Literal["start"] = "start"
    prompt_tokens: int
    cached_tokens: int = 0
    # The prompt, when the request asked to echo it (with the prompt's log probabilities, it
    # comes with them in the first delta instead, once they are computed).
    prompt_text: str | None = None


class TokenLogprob(Message):
    """A token's log probability and the most likely tokens in its place (an echoed prompt's
    first token has none: nothing comes before it)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


class ToolCallPiece(Message):
    """A piece of a tool call the model made, as it was written: the first names the call (its
    id and name), the next ones carry its arguments' JSON text. The last piece of a call whose
    arguments are one whole JSON object says so (`whole`); a call that never gets one was cut
    short (by the token limit) or did not parse, and has no place in a whole answer."""

    index: int  # the call's place among the answer's calls
    id: str | None = None  # the first piece's
    name: str | None = None  # the first piece's
    arguments: str = ""
    whole: bool = False


class Delta(Message):
    kind: Literal["delta"] = "delta"
    text: str  # the answer's content
    tokens: int
    # With logprobs asked for: the tokens generated since the last delta (text can lag its
    # tokens, held back by the detokenizer or a possible stop string).
    logprobs: tuple[TokenLogprob, ...] = ()
    reasoning: str = ""  # the model's thinking (between its think markers)
    tool_calls: tuple[ToolCallPiece, ...] = ()


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
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]
    usage: Usage
    timings: Timings
    stop_sequence: str | None = None  # the stop string that ended the answer


class Error(Message):
    kind: Literal["error"] = "error"
    status: int
    message: str
    code: str = "server_error"


# The codes of the errors a request gets when the ring loses a rank: it was being generated
# (it ends with the error), or it was waiting and never started (the API may send it again).
RING_LOST = "ring_lost"
NOT_STARTED = "not_started"
RING_LOST_MESSAGE = "the ring lost a rank while this answer was being generated"
NOT_STARTED_MESSAGE = "the ring lost a rank before this request was started"
# Rank 0's socket is not there, or nobody listens on it: no rank 0 runs.
RANKS_NOT_RUNNING = "ranks_not_running"
# Rank 0 has as many connections open as it takes.
TOO_MANY_CONNECTIONS = "too_many_connections"


class RankShare(Message):
    """What one rank of a pipeline holds."""

    rank: int
    layers: tuple[int, int]  # the first layer it runs and one past its last
    weight_bytes: int
    memory_budget: int  # bytes it was allowed


# How rank 0 sees the ring: loading the model, serving, waiting too long on a rank (or a
# model step), or broken (a collective failed: a rank is gone).
RingState = Literal["loading", "serving", "waiting", "broken"]


class ClusterInfo(Message):
    kind: Literal["info"] = "info"
    model: str
    model_path: str
    ranks: int
    backend: str
    context_limit: int
    quantization: str | None = None  # e.g. "4-bit (group 64)"; None: full precision
    dtype: str
    parameters: int
    parallel: str = "single"  # single, tensor or pipeline
    split: tuple[RankShare, ...] = ()  # a pipeline's layers and weight bytes per rank
    max_request_bytes: int  # the largest HTTP body that can carry a prompt that fits
    ready: bool
    reason: str | None = None
    state: RingState = "loading"
    queued: int = 0  # requests waiting for room in the batch
    running: int = 0  # requests being generated
    generated_tokens: int = 0  # tokens the ring generated since it started, counted as taken
    prefix_cache: dict[str, int] = Field(default_factory=dict)


class TelemetryReply(Message):
    kind: Literal["telemetry"] = "telemetry"
    ranks: tuple[dict[str, Any], ...]


class TokenCount(Message):
    kind: Literal["count"] = "count"
    tokens: int


Reply = Annotated[
    Start | Delta | Done | Error | ClusterInfo | TelemetryReply | TokenCount,
    Field(discriminator="kind"),
]

REQUEST_ADAPTER: TypeAdapter[Request] = TypeAdapter(Request)
REPLY_ADAPTER: TypeAdapter[Reply] = TypeAdapter(Reply)
