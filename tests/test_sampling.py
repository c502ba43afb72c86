"""Sampling filters at the edges of their ranges (every rank must draw alike)."""

from __future__ import annotations

import mlx.core as mx

from ringserve.engine.sampling import sampler_for
from ringserve.ipc.messages import SamplingParams


def test_the_smallest_top_p_keeps_only_the_likeliest_token() -> None:
    # 5e-324 times the probability mass is 0 in float32: the filter must still keep one token.
    logits = [0.5, 1.0, 2.9] * 64
    logits[1] = 3.0
    logprobs = mx.log(mx.softmax(mx.array([logits]), axis=-1))
    for top_p in (5e-324, 1e-45, 1e-30):
        for seed in range(8):
            sample = sampler_for(SamplingParams(top_p=top_p), seed)
            assert sample(logprobs).item() == 1
