"""Sampling parameters to mlx-lm's sampler and logits processors (the same on every rank)."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.sample_utils import LogitsProcessor, Sampler, make_logits_processors, make_sampler

from ringserve.ipc.messages import SamplingParams


def sampler_for(params: SamplingParams) -> Sampler:
    return make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,
        min_p=params.min_p,
        top_k=params.top_k,
    )


# How many of the latest tokens the repetition, presence and frequency penalties look at
# (mlx-lm's default, named here because the prefix cache must supply that many).
PENALTY_CONTEXT = 20


def logits_processors_for(
    params: SamplingParams, cached_prompt: Sequence[int] = ()
) -> list[LogitsProcessor]:
    """mlx-lm's processors, seeing what a cold run sees: generate_step only passes them the
    tokens it prefills, so the prompt tokens that came from the prefix cache go first."""
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT,
    )
    if not cached_prompt or not processors:
        return processors
    history = mx.array(list(cached_prompt[-PENALTY_CONTEXT:]), dtype=mx.int32)
    return [_with_history(history, processors)]


def _with_history(history: mx.array, processors: list[LogitsProcessor]) -> LogitsProcessor:
    """One processor running all of them on the cached tokens followed by the seen ones. Only
    the last PENALTY_CONTEXT tokens matter, so each step joins at most twice that many."""

    def seeing_history(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens[-PENALTY_CONTEXT:].astype(mx.int32)
        window = mx.concatenate([history, recent])
        for processor in processors:
            logits = processor(window, logits)
        return logits

    return seeing_history
