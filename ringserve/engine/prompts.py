"""Turning an API request into validated prompt tokens on rank 0 (in the socket thread)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.engine.call_reader import writes_json_calls
from ringserve.engine.requests import AnswerShape, PreparedRequest
from ringserve.engine.structure import (
    Grammars,
    ToolFormat,
    grammar,
    json_answer,
    marker,
    tool_answer,
)
from ringserve.errors import GenerationError
from ringserve.ipc.framing import MAX_FRAME_BYTES
from ringserve.ipc.messages import ChatRequest, ChatTurn, GenerationRequest, SamplingParams, Tool

# Normalizers may shorten text before it is tokenized (NFC joins a letter and its accent):
# a token is allowed twice the bytes of the longest one when the length of text alone is judged.
NORMALIZED_SLACK = 2
# JSON writes a byte of text in at most 6 (`\u0000`); a message costs at least a token of the
# template and some JSON around it; the rest of a body (sampling fields, logit_bias, tools)
# gets a fixed allowance.
JSON_BYTES_PER_TEXT_BYTE = 6
JSON_BYTES_PER_TOKEN = 64
BODY_ALLOWANCE = 1 << 20
# Text of more characters a token than this may not fit: it is counted in pieces of
# COUNT_PIECE_CHARS first, which stops as soon as the context is full.
TYPICAL_TOKEN_CHARS = 3
COUNT_PIECE_CHARS = 1 << 14


@dataclass(frozen=True)
class Limits:
    context_limit: int
    default_max_tokens: int
    max_tokens_limit: int
    vocab_size: int  # the model's logits: token ids run from 0 to vocab_size - 1
    max_token_bytes: int  # UTF-8 bytes of the longest token's text

    @property
    def max_prompt_bytes(self) -> int:
        """Text longer than this (in UTF-8 bytes) cannot fit the context, tokenized or not."""
        return self.context_limit * self.max_token_bytes * NORMALIZED_SLACK

    @property
    def max_request_bytes(self) -> int:
        """The largest HTTP body that can carry a prompt that fits (and a socket frame holds)."""
        derived = (
            self.max_prompt_bytes * JSON_BYTES_PER_TEXT_BYTE
            + self.context_limit * JSON_BYTES_PER_TOKEN
            + BODY_ALLOWANCE
        )
        return min(derived, MAX_FRAME_BYTES // 2)


def longest_token_bytes(texts: Sequence[str]) -> int:
    """UTF-8 bytes of the longest of the `texts` the vocabulary's tokens decode to (a partial
    character counts as the 3 bytes of its replacement, which only overestimates)."""
    return max((len(text.encode("utf-8", "replace")) for text in texts), default=1) or 1


class PromptBuilder:
    def __init__(self, tokenizer: TokenizerWrapper, limits: Limits, grammars: Grammars) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammars = grammars
        # A template that names no `developer` role drops such turns (Qwen's do): they go to
        # it as system turns, which is what OpenAI's developer role replaces.
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.developer_role = "developer" if "developer" in template else "system"

    def chat_text(self, request: ChatRequest, add_generation_prompt: bool = True) -> str:
        """The conversation through the model's chat template, tools offered when there are."""
        tools = self._offered_tools(request)
        messages = [_template_message(turn, self.developer_role) for turn in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=[tool.definition() for tool in tools] or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **request.chat_template_kwargs,
            )
        except Exception as exc:  # templates raise arbitrary errors on odd conversations
            raise GenerationError(
                f"the chat template rejected these messages: {exc}", 400, "invalid_messages"
            ) from exc
        return str(text)

    def _offered_tools(self, request: ChatRequest) -> tuple[Tool, ...]:
        if not request.tools or request.tool_choice == "none":
            return ()
        if not self.tokenizer.has_tool_calling:
            raise GenerationError(
                "tools: this model's chat template has no tool calling (mlx-lm finds no tool "
                "call format for it), so it cannot be offered tools",
                400,
                "tools_unsupported",
            )
        return request.tools

    def shape(self, request: ChatRequest, text: str) -> AnswerShape:
        """How the answer is read (does it start thinking; which tools it may call) and what
        decoding holds it to."""
        thinking = self._starts_thinking(request, text)
        tools = self._offered_tools(request)
        answer: str | None = None
        if request.response_format is not None:
            if request.tool_choice not in ("auto", "none") and tools:
                raise GenerationError(
                    "response_format and a required tool call cannot both be enforced",
                    400,
                    "invalid_format",
                )
            schema = request.response_format.json_schema or {"type": "object"}
            answer = json_answer(schema)
        elif tools and request.tool_choice not in ("auto", "none"):
            named = [t for t in tools if t.name == request.tool_name]
            required = named or list(tools)
            answer = tool_answer(
                [t.definition() for t in required],
                self._tool_format(),
                several=request.parallel_tool_calls and not named,
            )
        compiled = None
        if answer is not None:
            think_end = None
            if thinking:
                tokenizer = self.tokenizer
                think_end = self._marker(str(tokenizer.think_end), tokenizer.think_end_tokens)
            compiled = grammar(answer, think_end)
            self.grammars.check(compiled)
        # A JSON answer is read as it is: a marker's text inside a string is the string's.
        markers = request.response_format is None
        definitions = tuple(t.definition() for t in tools)
        return AnswerShape(thinking, definitions, compiled, chat=True, markers=markers)

    def _starts_thinking(self, request: ChatRequest, text: str) -> bool:
        """Whether the template opened a think block for the answer: what the generation prompt
        adds to the conversation (the messages themselves may well mention the markers)."""
        start, end = self.tokenizer.think_start, self.tokenizer.think_end
        if not self.tokenizer.has_thinking or start is None or end is None:
            return False
        conversation = self.chat_text(request, add_generation_prompt=False)
        added = text[len(conversation) :] if text.startswith(conversation) else ""
        return added.rfind(start) > added.rfind(end)

    def _tool_format(self) -> ToolFormat:
        parser = self.tokenizer.tool_parser
        start, end = self.tokenizer.tool_call_start, self.tokenizer.tool_call_end
        if not writes_json_calls(parser) or not end:
            raise GenerationError(
                "tool_choice: a required or named tool call is enforced only for models that "
                "write calls as JSON between markers (Qwen and Hermes style); use auto",
                400,
                "tools_unsupported",
            )
        tokenizer = self.tokenizer
        return ToolFormat(
            self._marker(str(start), tokenizer.tool_call_start_tokens),
            self._marker(str(end), tokenizer.tool_call_end_tokens),
        )

    def _marker(self, text: str, ids: tuple[int, ...] | None) -> str:
        special = {i for i, added in self.tokenizer.added_tokens_decoder.items() if added.special}
        return marker(text, ids or (), special)

    def tokens(self, request: GenerationRequest) -> list[int]:
        self._refuse_unfittable_text(request)
        if isinstance(request, ChatRequest):
            return self._encode(self.chat_text(request), add_special_tokens=False)
        if isinstance(request.prompt, str):
            return self._encode(request.prompt, add_special_tokens=True)
        outside = [t for t in request.prompt if t >= self.limits.vocab_size]
        if outside:
            raise GenerationError(
                f"the prompt names token ids outside the vocabulary "
                f"(0..{self.limits.vocab_size - 1}): {outside[:5]}",
                400,
                "invalid_prompt",
            )
        return list(request.prompt)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The text's tokens. Text long enough that it may not fit the context is counted in
        pieces first, and refused as soon as the count proves it cannot: the work stops at the
        context, not at the end of the text."""
        limit = self.limits.context_limit
        if len(text) > limit * TYPICAL_TOKEN_CHARS:
            counted = pieces = start = 0
            while start < len(text):
                # Cut at a space: a marker (a special token's text) holds none.
                end = start + COUNT_PIECE_CHARS
                if end < len(text):
                    end = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
                    end = end if end > start else start + COUNT_PIECE_CHARS
                counted += len(self.tokenizer.encode(text[start:end], add_special_tokens=False))
                pieces, start = pieces + 1, end
                # A cut may split one token in two: each piece may count one too many.
                if counted - pieces >= limit:
                    raise GenerationError(
                        f"the prompt has more than {counted - pieces} tokens (counting stopped "
                        f"there), but this model's context limit is {limit} tokens",
                        400,
                        "context_length_exceeded",
                    )
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _refuse_unfittable_text(self, request: GenerationRequest) -> None:
        """Refuse text whose length alone proves it cannot fit, before the work of tokenizing."""
        if isinstance(request, ChatRequest):
            size = sum(_turn_bytes(turn) for turn in request.messages)
        elif isinstance(request.prompt, str):
            size = len(request.prompt.encode())
        else:
            return
        if size > self.limits.max_prompt_bytes:
            fewest = size // (self.limits.max_token_bytes * NORMALIZED_SLACK)
            raise GenerationError(
                f"the prompt's {size} bytes of text make at least {fewest} tokens, but this "
                f"model's context limit is {self.limits.context_limit} tokens",
                400,
                "context_length_exceeded",
            )

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        self._refuse_unfittable_text(request)
        shape = AnswerShape()
        if isinstance(request, ChatRequest):
            text = self.chat_text(request)
            shape = self.shape(request, text)
            tokens = self._encode(text, add_special_tokens=False)
        else:
            tokens = self.tokens(request)
        limits = self.limits
        sampling = self._sampling(request.sampling)
        if not tokens:
            raise GenerationError("the prompt is empty", 400, "empty_prompt")
        if len(tokens) >= limits.context_limit:
            raise GenerationError(
                f"the prompt has {len(tokens)} tokens, but this model's context limit is "
                f"{limits.context_limit} tokens",
                400,
                "context_length_exceeded",
            )
        room = limits.context_limit - len(tokens)
        if request.max_tokens_ceiling and sampling.max_tokens is not None:
            sampling = sampling.model_copy(
                update={"max_tokens": min(sampling.max_tokens, limits.max_tokens_limit, room)}
            )
        if sampling.max_tokens is not None and sampling.max_tokens > limits.max_tokens_limit:
            raise GenerationError(
                f"max_tokens={sampling.max_tokens} exceeds this server's limit of "
                f"{limits.max_tokens_limit}",
                400,
                "invalid_max_tokens",
            )
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise GenerationError(
                f"this model's context limit is {limits.context_limit} tokens, but "
                f"{len(tokens) + sampling.max_tokens} were requested ({len(tokens)} in the "
                f"prompt, {sampling.max_tokens} for the completion)",
                400,
                "context_length_exceeded",
            )
        asked = sampling.max_tokens
        max_tokens = min(limits.default_max_tokens if asked is None else asked, room)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        echoed = getattr(request, "echo", False)
        return PreparedRequest(
            tokens=tokens,
            sampling=sampling,
            max_tokens=max_tokens,
            seed=seed,
            conversation_id=request.conversation_id,
            cache_scope=request.cache_scope,
            client=request.client,
            prompt_text=self.tokenizer.decode(tokens) if echoed else None,
            shape=shape,
            prompt_logprobs=sampling.logprobs if echoed else None,
        )

    def _sampling(self, sampling: SamplingParams) -> SamplingParams:
        """The sampling parameters checked against the model, in the form the ranks use."""
        vocab = self.limits.vocab_size
        bad_bias = [t for t in sampling.logit_bias if t >= vocab]
        if bad_bias:
            raise GenerationError(
                f"logit_bias names token ids outside the vocabulary (0..{vocab - 1})"
                f": {bad_bias[:5]}",
                400,
                "invalid_logit_bias",
            )
        if sampling.top_k >= vocab:  # keeps every token, as 0 does (mlx-lm refuses it)
            return sampling.model_copy(update={"top_k": 0})
        return sampling


def _template_message(turn: ChatTurn, developer_role: str) -> dict[str, Any]:
    """A turn as chat templates expect it (tool call arguments as an object)."""
    role = developer_role if turn.role == "developer" else turn.role
    message: dict[str, Any] = {"role": role, "content": turn.content}
    if turn.name is not None:
        message["name"] = turn.name
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.loads(call.arguments)},
            }
            for call in turn.tool_calls
        ]
    if turn.tool_call_id is not None:
        message["tool_call_id"] = turn.tool_call_id
    if turn.reasoning is not None:
        message["reasoning_content"] = turn.reasoning
    return message


def _turn_bytes(turn: ChatTurn) -> int:
    return len(turn.content.encode()) + sum(len(c.arguments.encode()) for c in turn.tool_calls)
