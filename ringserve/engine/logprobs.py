"""A generated token's log probability, and its alternatives, in the client's words."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

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
