"""A token's log probability, and its alternatives, in the client's words: a generated
token's, or a scored prompt's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.engine.prompt_scores import PromptScores
from ringserve.ipc.messages import TokenLogprob

# What a token of no probability (or a distribution that overflowed) reports, as OpenAI does:
# JSON has no -Infinity or NaN.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def token_logprob(
    tokenizer: TokenizerWrapper, token: int, logprobs: mx.array, top: int
) -> TokenLogprob:
    """`logprobs` is generate_step's distribution for this position (after the logits
    processors, before temperature), as mlx-lm's own server reports it."""
    alternatives: tuple[tuple[str, float], ...] = ()
    if top:
        top_ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        ids, values = np.array(top_ids).tolist(), np.array(logprobs[top_ids]).tolist()
        ranked = sorted(zip(ids, values, strict=True), key=lambda pair: -pair[1])
        alternatives = tuple((tokenizer.decode([i]), _finite(value)) for i, value in ranked)
    chosen = _finite(float(np.array(logprobs[token])))
    return TokenLogprob(token=tokenizer.decode([token]), logprob=chosen, top=alternatives)


def token_texts(tokenizer: TokenizerWrapper) -> tuple[str, ...]:
    """The text each token of the vocabulary decodes to alone, decoded once (a prompt's scores
    name thousands of tokens a step)."""
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def prompt_logprobs(
    texts: Sequence[str], tokens: Sequence[int], scores: PromptScores
) -> list[TokenLogprob]:
    """The entries of a scored chunk of the prompt `tokens`; the first chunk's start with the
    prompt's first token, which has no log probability."""

    def text(token: int) -> str:  # a model's logits may be wider than its tokenizer
        return texts[token] if token < len(texts) else ""

    entries = [TokenLogprob(token=text(tokens[0]), logprob=None)] if scores.start == 1 else []
    ids, values = scores.top_ids.tolist(), scores.top_logprobs.tolist()
    for offset, logprob in enumerate(scores.logprobs.tolist()):
        top = tuple(
            (text(i), _finite(value)) for i, value in zip(ids[offset], values[offset], strict=True)
        )
        token = tokens[scores.start + offset]
        entries.append(TokenLogprob(token=text(token), logprob=_finite(logprob), top=top))
    return entries
