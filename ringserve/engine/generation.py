"""One request's generation on one rank: mlx-lm's generate_step over a KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step

from ringserve.distributed.ops import GenerateOp
from ringserve.engine.sampling import logits_processors_for, sampler_for


class Generation:
    """Prefills `prompt` (the tokens not already in `cache`) on the first step, then decodes."""

    def __init__(
        self,
        model: nn.Module,
        op: GenerateOp,
        prompt: list[int],
        cache: list[Any],
        on_prefill_chunk: Callable[[], None] | None = None,
    ):
        self.op = op
        self.cache = cache
        self.generated: list[int] = []
        self.logprobs: mx.array | None = None  # the distribution the last token was drawn from
        # The seed is broadcast, so every rank draws the same token from the same logits.
        mx.random.seed(op.seed % 2**64)
        cached_prompt = op.tokens[: len(op.tokens) - len(prompt)]
        self._steps: Iterator[tuple[mx.array, mx.array]] = generate_step(
            mx.array(prompt),
            model,
            max_tokens=op.max_tokens,
            sampler=sampler_for(op.sampling),
            logits_processors=logits_processors_for(op.sampling, cached_prompt),
            prompt_cache=cache,
            prompt_progress_callback=(lambda _done, _total: on_prefill_chunk())
            if on_prefill_chunk
            else None,
        )

    def step(self) -> int:
        yielded, self.logprobs = next(self._steps)
        token = int(yielded)  # generate_step already yields a Python int
        self.generated.append(token)
        return token
