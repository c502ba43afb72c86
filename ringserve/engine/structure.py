"""Answers held to a shape while they are decoded: JSON (a schema, or any object) and tool calls
(`tool_choice` required or named), with llguidance's grammars.

Rank 0 writes a request's grammar (it knows the tools, the model's tool-call markers and whether
the answer starts inside a think block) and checks that it compiles; the grammar travels in the
request's op, and every rank runs its own matcher on the same tokens, so the masks are the same
on every rank without being sent. A mask is a logits processor like the others: a batch mixes
constrained and free sequences.

Why llguidance: it works on token ids with NumPy bitmasks (MLX CPU, Metal and CUDA alike; no
torch, unlike xgrammar), takes JSON schemas and Lark grammars (so a tool call's markers and its
JSON fit in one grammar, which outlines-core's regex-based index does not express), and
computes a mask in tens of microseconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import LogitsProcessor
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.errors import GenerationError

log = logging.getLogger(__name__)

# JSON as `json.dumps` writes it: no free whitespace, which a model could repeat forever.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_answer(schema: dict[str, Any]) -> str:
    """A Lark grammar: a JSON value that `schema` accepts."""
    return f"start: %json {json.dumps({**schema, 'x-guidance': COMPACT_JSON})}"


@dataclass(frozen=True)
class ToolFormat:
    """How the model writes a tool call: its markers (as Lark terminals, `marker()`) around one
    JSON object, {"name", "arguments"} (Qwen's and Hermes' format; mlx-lm's `json_tools` parser
    reads it)."""

    start: str
    end: str


def marker(text: str, ids: Sequence[int], special_ids: set[int]) -> str:
    """A marker as a Lark terminal: a special token by its id (llguidance matches special
    tokens apart from text), else its text."""
    if len(ids) == 1 and ids[0] in special_ids:
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def tool_call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One call of any of `tools` (OpenAI function definitions), as a JSON schema."""
    calls = []
    for tool in tools:
        function = tool["function"]
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "x-guidance": COMPACT_JSON}


def tool_answer(tools: Sequence[dict[str, Any]], form: ToolFormat, several: bool) -> str:
    """A Lark grammar: one tool call or more (`several`), each between the model's markers."""
    return "\n".join(
        [
            'start: call ("\\n" call)*' if several else "start: call",
            f'call: {form.start} "\\n" body "\\n" {form.end}',
            f"body: %json {json.dumps(tool_call_schema(tools))}",
        ]
    )


def grammar(answer: str, think_end: str | None = None) -> str:
    """The llguidance grammar of a Lark `answer`; with `think_end` (a Lark terminal), for an
    answer that starts inside a think block, which it closes first (a constrained answer does
    not think: its shape is what was asked for)."""
    if think_end is not None:
        answer = answer.replace("start:", "answer:", 1)
        answer = f'start: {think_end} "\\n\\n" answer\n{answer}'
    return llguidance.LLMatcher.grammar_from_lark(answer)


class Grammars:
    """Grammars compiled against one tokenizer (its llguidance view is built once: ~1 s for a
    large vocabulary), and the logits processors that hold a sequence to one."""

    def __init__(self, tokenizer: TokenizerWrapper, vocab_size: int) -> None:
        self.eos_tokens = sorted(tokenizer.eos_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer._tokenizer, eos_token=self.eos_tokens
        )
        self.vocab_size = vocab_size

    def check(self, grammar: str) -> None:
        """Raise a 400 naming the problem when `grammar` does not compile."""
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise GenerationError(
                f"the requested format cannot be enforced: {problem}", 400, "invalid_format"
            )

    def processor(self, grammar: str) -> LogitsProcessor:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        return GrammarProcessor(matcher, self.vocab_size, self.eos_tokens)


class GrammarProcessor:
    """Masks the logits to the tokens the grammar allows next. It is called once per step with
    the sequence's tokens so far, the one just taken last (not on its first call: that one is
    the prompt's)."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_tokens: Sequence[int]
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_tokens = tuple(eos_tokens)
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.matcher.consume_token(int(np.asarray(tokens[-1:])[0]))
        self.started = True
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size]
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[: len(allowed)] = allowed.astype(bool)
        if not mask.any():
            # The grammar is done (the end token was taken: the sequence is leaving) or the
            # matcher broke: the end tokens are all that may follow.
            mask[list(self.eos_tokens)] = True
        return mx.where(mx.array(mask), logits, mx.array(-float("inf"), dtype=logits.dtype))
