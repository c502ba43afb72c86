"""Turning an API request into validated prompt tokens on rank 0 (in the socket thread)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.engine.requests import PreparedRequest
from ringserve.errors import GenerationError
from ringserve.ipc.framing import MAX_FRAME_BYTES
from ringserve.ipc.messages import ChatRequest, ChatTurn, GenerationRequest, SamplingParams

# Normalizers may shorten text before it is tokenized (NFC joins a letter and its accent):
# a token is allowed twice the bytes of the longest one when the length of text alone is judged.
NORMALIZED_SLACK = 2
# JSON writes a byte of text in at most 6 (`\u0000`); a message costs at least a token of the
# template and some JSON around it; the rest of a body (sampling fields, logit_bias, tools)
# gets a fixed allowance.
JSON_BYTES_PER_TEXT_BYTE = 6
JSON_BYTES_PER_TOKEN = 64
BODY_ALLOWANCE = 1 << 20


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


def longest_token_bytes(tokenizer: TokenizerWrapper) -> int:
    """UTF-8 bytes of the longest text one token decodes to (a partial character counts as
    the 3 bytes of its replacement, which only overestimates)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return max((len(text.encode("utf-8", "replace")) for text in texts), default=1) or 1


class PromptBuilder:
    def __init__(self, tokenizer: TokenizerWrapper, limits: Limits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    def tokens(self, request: GenerationRequest) -> list[int]:
        self._refuse_unfittable_text(request)
        if isinstance(request, ChatRequest):
            messages = [_template_message(turn) for turn in request.messages]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # templates raise arbitrary errors on odd conversations
                raise GenerationError(
                    f"the chat template rejected these messages: {exc}", 400, "invalid_messages"
                ) from exc
            return list(self.tokenizer.encode(str(text), add_special_tokens=False))
        if isinstance(request.prompt, str):
            return list(self.tokenizer.encode(request.prompt))
        outside = [t for t in request.prompt if t >= self.limits.vocab_size]
        if outside:
            raise GenerationError(
                f"the prompt names token ids outside the vocabulary "
                f"(0..{self.limits.vocab_size - 1}): {outside[:5]}",
                400,
                "invalid_prompt",
            )
        return list(request.prompt)

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
        if sampling.max_tokens is not None and sampling.max_tokens > limits.max_tokens_limit:
            raise GenerationError(
                f"max_tokens={sampling.max_tokens} exceeds this server's limit of "
                f"{limits.max_tokens_limit}",
                400,
                "invalid_max_tokens",
            )
        room = limits.context_limit - len(tokens)
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise GenerationError(
                f"this model's context limit is {limits.context_limit} tokens, but "
                f"{len(tokens) + sampling.max_tokens} were requested ({len(tokens)} in the "
                f"prompt, {sampling.max_tokens} for the completion)",
                400,
                "context_length_exceeded",
            )
        max_tokens = min(sampling.max_tokens or limits.default_max_tokens, room)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        echoed = getattr(request, "echo", False)
        return PreparedRequest(
            tokens=tokens,
            sampling=sampling,
            max_tokens=max_tokens,
            seed=seed,
            conversation_id=request.conversation_id,
            cache_scope=request.cache_scope,
            prompt_text=self.tokenizer.decode(tokens) if echoed else None,
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


def _template_message(turn: ChatTurn) -> dict[str, Any]:
    """A turn as chat templates expect it (tool call arguments as an object)."""
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
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
    return message


def _turn_bytes(turn: ChatTurn) -> int:
    return len(turn.content.encode()) + sum(len(c.arguments.encode()) for c in turn.tool_calls)
