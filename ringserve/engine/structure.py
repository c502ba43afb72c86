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
# Keywords llguidance does not implement (a `format` it does not know) are ignored rather than
# refused, and `oneOf` is read as `anyOf`: schemas made by pydantic use both.
COMPACT_JSON = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": True,
    "coerce_one_of": True,
}


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


def tool_answer(tools: Sequence[dict[str, Any]], form: ToolFormat, several: bool) -> str:
    """A Lark grammar: one tool call or more (`several`), each between the model's markers, a
    JSON object {"name": ..., "arguments": ...} of one of `tools` (OpenAI definitions). Each
    tool's parameters are a schema of their own (so their `$ref`s resolve)."""
    rules = ['start: call ("\\n" call)*' if several else "start: call"]
    rules.append(f'call: {form.start} "\\n" body "\\n" {form.end}')
    rules.append("body: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        function = tool["function"]
        head = json.dumps('{"name": ' + json.dumps(function["name"]) + ', "arguments": ')
        rules.append(f"call_{i}: {head} arguments_{i} " + json.dumps("}"))
        parameters = function.get("parameters") or {"type": "object"}
        rules.append(
            f"arguments_{i}: %json {json.dumps({**parameters, 'x-guidance': COMPACT_JSON})}"
        )
    return "\n".join(rules)


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

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self.eos_tokens = sorted(tokenizer.eos_token_ids)
        self.tokenizer: llguidance.LLTokenizer | None = None
        self.unavailable: str | None = None
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(
                tokenizer._tokenizer, eos_token=self.eos_tokens
            )
        except Exception as exc:  # a tokenizer llguidance cannot read: no formats, still serving
            log.warning("answers cannot be held to a format with this tokenizer: %s", exc)
            self.unavailable = f"{type(exc).__name__}: {exc}"

    def check(self, grammar: str) -> None:
        """Raise a 400 naming the problem when `grammar` does not compile."""
        if self.tokenizer is None:
            raise GenerationError(
                f"this model's tokenizer cannot enforce formats ({self.unavailable})",
                400,
                "invalid_format",
            )
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise GenerationError(
                f"the requested format cannot be enforced: {problem}", 400, "invalid_format"
            )

    def processor(self, grammar: str) -> LogitsProcessor:
        if self.tokenizer is None:  # rank 0 refuses such requests before they are queued
            raise ValueError(f"no grammars with this tokenizer ({self.unavailable})")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        return GrammarProcessor(matcher, self.eos_tokens)


class GrammarProcessor:
    """Masks the logits to the tokens the grammar allows next. It is called once per step with
    the sequence's tokens so far, the one just taken last (not on its first call: that one is
    the prompt's)."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_tokens: Sequence[int]) -> None:
        self.matcher = matcher
        self.eos_tokens = tuple(eos_tokens)
        self.started = False
        self.told = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.matcher.consume_token(int(np.asarray(tokens[-1:])[0]))
        self.started = True
        vocab = logits.shape[-1]
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:vocab]
        mask = np.zeros(vocab, dtype=bool)
        mask[: len(allowed)] = allowed.astype(bool)
        if not mask.any():
            # The grammar is done (the end token was taken: the sequence is leaving) or the
            # matcher broke: the end tokens are all that may follow.
            if self.matcher.is_error() and not self.told:
                log.warning("a grammar broke off an answer: %s", self.matcher.get_error())
                self.told = True
            mask[[t for t in self.eos_tokens if t < vocab]] = True
        return mx.where(mx.array(mask), logits, mx.array(-float("inf"), dtype=logits.dtype))
