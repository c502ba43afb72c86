"""Sampling parameters to mlx-lm's sampler and logits processors (the same on every rank)."""

from __future__ import annotations

from mlx_lm.sample_utils import LogitsProcessor, Sampler, make_logits_processors, make_sampler

from ringserve.ipc.messages import SamplingParams


def sampler_for(params: SamplingParams) -> Sampler:
    return make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,
        min_p=params.min_p,
        top_k=params.top_k,
    )


def logits_processors_for(params: SamplingParams) -> list[LogitsProcessor]:
    return make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )
