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

import hashlib
import json
import logging
import re
import re._parser as re_parser
import threading
import time
from collections import OrderedDict
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

# OpenAI's bounds on a structured output's schema.
MAX_SCHEMA_PROPERTIES = 5000
MAX_SCHEMA_ENUM_VALUES = 1000
MAX_SCHEMA_CHARS = 120_000
# llguidance's parser holds at most 2,000 items in a row, and each optional property of an
# object takes four: more fail to compile, after seconds of trying.
MAX_OPTIONAL_PROPERTIES = 450
# Characters a `pattern` may spell through its counted repeats: (={128}){3000} makes 384,000,
# and each of its steps took 0.3 s to mask; this bound keeps a step to milliseconds.
MAX_PATTERN_POSITIONS = 10_000
# Compiled grammars a rank keeps.
GRAMMAR_CACHE = 64
# Rank 0 tries a grammar's first steps before queueing its request: one that fails there (too
# complex for the parser), or whose steps together take longer than this, is refused.
TRIAL_STEPS = 3
MAX_TRIAL_S = 0.25

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
    check_schema(schema)
    return f"start: %json {json.dumps({**schema, 'x-guidance': COMPACT_JSON})}"


@dataclass
class _SchemaSize:
    properties: int = 0
    enum_values: int = 0
    chars: int = 0  # of property names, enum and const values


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse a schema past OpenAI's bounds for structured outputs, or with a pattern whose
    counted repeats make each decoding step's mask costly, before anything is compiled."""
    size = _SchemaSize()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        properties = node.get("properties")
        if isinstance(properties, dict):
            size.properties += len(properties)
            size.chars += sum(len(str(name)) for name in properties)
            required = node.get("required")
            named = (
                {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
            )
            optional = len(set(properties) - named)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise GenerationError(
                    f"an object of the schema has {optional} optional properties; at most "
                    f"{MAX_OPTIONAL_PROPERTIES} can be enforced (list the others in `required`)",
                    400,
                    "invalid_format",
                )
        for values in (node.get("enum"), [node["const"]] if "const" in node else None):
            if isinstance(values, list):
                size.enum_values += len(values)
                size.chars += sum(len(json.dumps(v)) for v in values)
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            _check_pattern(pattern)
        stack.extend(v for v in node.values() if isinstance(v, dict | list))
    for what, count, bound in (
        ("object properties", size.properties, MAX_SCHEMA_PROPERTIES),
        ("enum and const values", size.enum_values, MAX_SCHEMA_ENUM_VALUES),
        ("characters of property names and enum values", size.chars, MAX_SCHEMA_CHARS),
    ):
        if count > bound:
            raise GenerationError(
                f"the schema has {count} {what}; at most {bound} can be enforced",
                400,
                "invalid_format",
            )


def _check_pattern(pattern: str) -> None:
    try:
        parsed = re_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return  # not Python's dialect: llguidance judges it
    positions = _positions(parsed)
    if positions > MAX_PATTERN_POSITIONS:
        raise GenerationError(
            f"the pattern {pattern[:60]!r} repeats to {positions} characters; its counted "
            f"repeats may make at most {MAX_PATTERN_POSITIONS} (each step's mask grows with them)",
            400,
            "invalid_format",
        )


def _positions(items: Any) -> int:
    """Characters a parsed pattern spells at the most (an open repeat counted once)."""
    total = 0
    for op, value in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = value
            count = low if high == re_parser.MAXREPEAT else high
            total += max(count, 1) * _positions(sub)
        elif name in ("SUBPATTERN", "ATOMIC_GROUP"):
            total += _positions(value[-1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            total += _positions(value[1])
        elif name == "BRANCH":
            total += max((_positions(branch) for branch in value[1]), default=0)
        elif name != "AT":
            total += 1
    return total


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
        check_schema(parameters)
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
    large vocabulary), and the logits processors that hold a sequence to one.

    Compiled grammars are kept (a sequence gets a copy): agents send the same schemas and tools
    turn after turn, and a large schema takes seconds to compile."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self.eos_tokens = sorted(tokenizer.eos_token_ids)
        self.tokenizer: llguidance.LLTokenizer | None = None
        self.unavailable: str | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(
                tokenizer._tokenizer, eos_token=self.eos_tokens
            )
        except Exception as exc:  # a tokenizer llguidance cannot read: no formats, still serving
            log.warning("answers cannot be held to a format with this tokenizer: %s", exc)
            self.unavailable = f"{type(exc).__name__}: {exc}"

    def check(self, grammar: str) -> None:
        """Raise a 400 naming the problem when `grammar` does not compile, or when its first
        steps fail or take so long that every step would stall the batch (rank 0 tries it
        before the request is queued)."""
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
        trial = self._compiled_matcher(grammar).deep_copy()
        started = time.monotonic()
        for _ in range(TRIAL_STEPS):
            bits = np.frombuffer(trial.compute_bitmask(), dtype=np.uint8)
            allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little"))
            if trial.is_error() or not len(allowed):
                break
            trial.consume_token(int(allowed[0]))
        if trial.is_error():
            raise GenerationError(
                f"the requested format cannot be enforced: {trial.get_error()}",
                400,
                "invalid_format",
            )
        took = time.monotonic() - started
        if took > MAX_TRIAL_S:
            raise GenerationError(
                f"the requested format takes {took:.2f} s a token to enforce (at most "
                f"{MAX_TRIAL_S} s); simplify its patterns or its size",
                400,
                "invalid_format",
            )

    def processor(self, grammar: str) -> LogitsProcessor:
        if self.tokenizer is None:  # rank 0 refuses such requests before they are queued
            raise ValueError(f"no grammars with this tokenizer ({self.unavailable})")
        return GrammarProcessor(self._compiled_matcher(grammar).deep_copy(), self.eos_tokens)

    def _compiled_matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher at the grammar's start, compiled once (never consumed: callers copy it)."""
        key = hashlib.sha256(grammar.encode()).hexdigest()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        assert self.tokenizer is not None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > GRAMMAR_CACHE:
                self._compiled.popitem(last=False)
        return matcher


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
