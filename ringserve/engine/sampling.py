"""Sampling parameters to a sequence's sampler and logits processors, the same on every rank.

Each sequence draws from its own random key, derived from its request's seed and split once
per token: a seeded request gives the same tokens alone or in any batch, on any number of
ranks, and no sequence's draws depend on another's (there is no shared `mx.random.seed`).
The filters are mlx-lm's own, applied in the order its `make_sampler` applies them.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    LogitsProcessor,
    Sampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from ringserve.ipc.messages import SamplingParams

# How many of the latest tokens the repetition, presence and frequency penalties look at
# (mlx-lm's default).
PENALTY_CONTEXT = 20
# The smallest top_p mlx-lm's filter takes (float32's smallest normal number): below it, top_p
# times the probability mass rounds to 0 and the filter reads past the vocabulary's end, each
# rank its own memory, so that ranks sampled different tokens.
TOP_P_FLOOR = 2.0**-126


def sampler_for(params: SamplingParams, seed: int) -> Sampler:
    if params.temperature == 0:
        return greedy_sampler
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < params.top_p < 1.0:
        top_p = max(params.top_p, TOP_P_FLOOR)
        filters.append(lambda x: apply_top_p(x, top_p))
    if params.min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    key = mx.random.key(seed % 2**64)
    scale = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        for keep in filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs * scale, key=draw)

    return sample


def logits_processors_for(params: SamplingParams) -> list[LogitsProcessor]:
    """mlx-lm's processors. The batch generator shows them the whole prompt, the part that
    came from the prefix cache included, and what was generated, so warm equals cold."""
    return make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT,
    )
