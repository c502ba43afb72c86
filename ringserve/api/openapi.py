"""The answers the API gives, as its OpenAPI schema declares them (OpenAI's objects, as this
server fills them). The routes build plain dicts; these models document them, and the fuzz
test checks every answer against them."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ringserve.api.errors import ANTHROPIC_ERROR_RESPONSES, ERROR_RESPONSES
from ringserve.api.schemas import OpenAIModel

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class CachedTokens(BaseModel):
    cached_tokens: int


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class FunctionCalled(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCalled


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # the model's thinking, where it thinks
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageOut


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # an echoed prompt's first token has none
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageOut


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class AnthropicBlock(BaseModel):
    type: Literal["text", "thinking", "tool_use"]
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None


class AnthropicMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[AnthropicBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: AnthropicUsage


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]  # messages, function calls and reasoning, as OpenAI's
    usage: ResponseUsage | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class InputTokens(BaseModel):
    input_tokens: int


class Restarts(BaseModel):
    """The keeper's restarts of the ring (see ringserve/api/restarts.py)."""

    supervised: bool
    count: int
    restarting: bool | None = None
    last_at: str | None = None
    last_reason: str | None = None
    hosts_left_out: int | list[str] | None = None
    gave_up: str | None = None


class Readiness(BaseModel):
    ready: bool
    reason: str | None
    ranks: int | None = None
    restarts: Restarts | None = None


# Each server-sent event: `data:` a chunk's JSON, an error's JSON, or `[DONE]`.
_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
_EVENTS = {"text/event-stream": {"schema": _EVENT}}


def generation_responses(
    answer: type[BaseModel], anthropic: bool = False
) -> dict[int | str, dict[str, Any]]:
    """A generation route's answers: the object, or (`stream: true`) server-sent events."""
    return {
        200: {
            "model": answer,
            "description": f"A {answer.__name__}; with `stream: true`, server-sent events",
            "content": _EVENTS,
        },
        **(ANTHROPIC_ERROR_RESPONSES if anthropic else ERROR_RESPONSES),
    }


READINESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Readiness, "description": "Every rank answers"},
    503: {"model": Readiness, "description": "Not every rank is serving"},
}


def describe(app: FastAPI) -> None:
    """The app's OpenAPI schema as the API behaves: validation errors are 400s (declared),
    never FastAPI's 422; and `null` is accepted wherever a request field may be left out."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
                    # A body route's body is described in place (it is declared unvalidated).
                    body = operation.get("requestBody", {}).get("content", {})
                    _nullable_optionals(body.get("application/json", {}).get("schema", {}))
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model in _request_models(OpenAIModel):
                _nullable_optionals(components.get(model.__name__, {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _request_models(base: type[BaseModel]) -> list[type[BaseModel]]:
    found = []
    for model in base.__subclasses__():
        found += [model, *_request_models(model)]
    return found


def _nullable_optionals(schema: dict[str, Any]) -> None:
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or _allows_null(prop):
            continue
        schema["properties"][name] = {
            "anyOf": [
                {k: v for k, v in prop.items() if k not in ("title", "default")},
                {"type": "null"},
            ],
            **{k: v for k, v in prop.items() if k in ("title", "default")},
        }


def _allows_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(p.get("type") == "null" for p in prop.get("anyOf", ()))
