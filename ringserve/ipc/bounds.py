"""The bounds of every request field, defined once: the API validates what clients send with
them, and the socket messages to rank 0 are held to the same ones."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
# 0 keeps every token; so does a value of the vocabulary size or more (rank 0 knows that size).
TopK = Annotated[int, Field(ge=0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
# OpenAI's seed is any signed 64-bit integer; MLX takes it modulo 2**64.
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]
# Presence and frequency penalties, as OpenAI bounds them.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# mlx-lm divides positive logits by it: near 0 they overflow (NaN log probabilities).
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10.0)]
TokenId = Annotated[int, Field(ge=0)]
# Token ids as JSON object keys: strings of digits.
LogitBias = Annotated[
    dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]],
    Field(json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}),
]
MaxTokens = Annotated[int, Field(ge=1)]
# A legacy completion may ask for no tokens at all: with echo, the prompt alone (and its log
# probabilities), as evaluation harnesses score a text.
EchoMaxTokens = Annotated[int, Field(ge=0)]
MAX_STOP_STRINGS = 4
# Characters of one stop string: stops are short markers; rank 0 looks for them in a window
# as long as the longest, for every token of the answer.
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[tuple[StopString, ...], Field(max_length=MAX_STOP_STRINGS)]
# Alternatives per token: chat's `top_logprobs`, and the legacy completions' `logprobs`.
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)]
# Choices a request may ask for (`n`, times the prompts of a legacy completion); they are
# generated together.
MAX_CHOICES = 16
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]

# How deep (in JSON levels: objects and arrays) a JSON schema, or a tool call's arguments, may
# nest. OpenAI's structured outputs allow 10 levels of nested objects, which take 20 to 40 of
# these (a property's schema sits two below its object's: `properties`, then its name); the
# socket frame's parser gives out near 200, and a grammar's cost grows with the depth.
MAX_NESTING = 64
# A body holds its schemas a few levels down (`tools[i].function.parameters`, a namespace's
# tools in a Responses request): the whole body may nest this deep.
MAX_BODY_NESTING = MAX_NESTING + 8
# JSON values in a tool call's arguments a client sends back (each value the model wrote took
# it a token or more).
MAX_ARGUMENT_VALUES = 1 << 16
# Objects and arrays a body may hold per token of its context (see BodyBounds.max_containers).
CONTAINERS_PER_TOKEN = 4
# JSON values a body may hold beyond its prompts' (sampling fields, tools and their schemas,
# logit_bias): see BodyBounds.max_values.
BODY_VALUES_ALLOWANCE = 1 << 16
BODY_CONTAINERS_ALLOWANCE = 1 << 14


def nesting(value: Any, deepest_allowed: int = MAX_NESTING) -> int:
    """How many levels of objects and arrays `value` nests (0: a plain value), counted up to
    one past `deepest_allowed`. Walked without recursion."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending and deepest <= deepest_allowed:
        item, level = pending.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        pending.extend((child, level + 1) for child in children)
    return deepest


def too_deep(deepest_allowed: int) -> str:
    return f"nests more than {deepest_allowed} levels of objects and arrays, the most allowed"


def _shallow(value: dict[str, Any]) -> dict[str, Any]:
    if nesting(value) > MAX_NESTING:
        raise ValueError(too_deep(MAX_NESTING))
    return value


# A JSON schema a request carries (a tool's parameters, the answer's format).
JsonSchema = Annotated[dict[str, Any], AfterValidator(_shallow)]


@dataclass(frozen=True)
class BodyBounds:
    """What one request body may hold, derived from the served model's context: a body that
    holds more is refused before any work on its contents."""

    context_limit: int
    max_bytes: int  # the largest body that can carry a prompt that fits (rank 0 derives it)

    @property
    def max_values(self) -> int:
        """JSON values (objects, arrays and their items): a prompt's token is written with at
        most one (a token id; a message or a content part takes a token or more, and is
        written with a few values), a request holds at most MAX_CHOICES prompts, and the rest
        of the body gets BODY_VALUES_ALLOWANCE."""
        return MAX_CHOICES * self.context_limit + BODY_VALUES_ALLOWANCE

    @property
    def max_containers(self) -> int:
        """Objects and arrays among those values: a message, a content part, a tool call and
        its function each take one, and each but the call's function a token or more."""
        return CONTAINERS_PER_TOKEN * self.context_limit + BODY_CONTAINERS_ALLOWANCE

    @property
    def max_turns(self) -> int:
        """Messages, input items, content parts and blocks of one conversation: each that
        holds anything takes at least one token of the context."""
        return self.context_limit

    @property
    def max_prompt_tokens(self) -> int:
        """Token ids of one prompt: the context must keep room for one generated token."""
        return self.context_limit - 1
