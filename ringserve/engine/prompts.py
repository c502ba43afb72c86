"""Turning an API request into validated prompt tokens on rank 0 (in the socket thread)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.engine.requests import PreparedRequest
from ringserve.errors import GenerationError
from ringserve.ipc.messages import ChatRequest, GenerationRequest


@dataclass(frozen=True)
class Limits:
    context_limit: int
    default_max_tokens: int
    max_tokens_limit: int
    vocab_size: int


class PromptBuilder:
    def __init__(self, tokenizer: TokenizerWrapper, limits: Limits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    def tokens(self, request: GenerationRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            messages = [turn.model_dump() for turn in request.messages]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # templates raise arbitrary errors on odd conversations
                raise GenerationError(
                    f"the chat template rejected these messages: {exc}", 400, "invalid_messages"
                ) from exc
            return list(self.tokenizer.encode(str(text), add_special_tokens=False))
        return list(self.tokenizer.encode(request.prompt))

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        tokens = self.tokens(request)
        limits = self.limits
        sampling = request.sampling
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
        bad_bias = [t for t in sampling.logit_bias if not 0 <= t < limits.vocab_size]
        if bad_bias:
            raise GenerationError(
                f"logit_bias names token ids outside the vocabulary (0..{limits.vocab_size - 1})"
                f": {bad_bias[:5]}",
                400,
                "invalid_logit_bias",
            )
        max_tokens = min(sampling.max_tokens or limits.default_max_tokens, room)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        return PreparedRequest(
            tokens=tokens,
            sampling=sampling,
            max_tokens=max_tokens,
            seed=seed,
            conversation_id=request.conversation_id,
        )
