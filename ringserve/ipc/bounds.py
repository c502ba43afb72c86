"""The bounds of every request field, defined once: the API validates what clients send with
them, and the socket messages to rank 0 are held to the same ones."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

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
