"""The log probability of each prompt token, from the forward pass that prefills the prompt.

A prompt scored this way is prefilled here, chunk by chunk, before it joins the batch: a chunk
of positions gives the logits that predict the token after each, so a prompt of n tokens is
scored by prefilling its first n - 1 (the last one's logits predict the answer's first token,
and the batch computes them). Of each position only the token's own log probability and the
`top` most likely are kept, so a long prompt costs no more memory than its chunk's logits.

Every rank runs the same chunks and evaluates the same scores: the logits may hang on a
collective (a pipeline gathers the last stage's hidden state; a tensor split sums the last
layer's), which every rank must reach alike. Only rank 0 reads the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ringserve.distributed.ops import GenerateOp


@dataclass(frozen=True)
class PromptScores:
    """One chunk's scores: of prompt tokens `start` .. `start + len(logprobs) - 1` (the first,
    token 0, has none). `last`: the prompt is scored to its end; the sequence joins the batch."""

    request_id: int
    start: int
    logprobs: np.ndarray  # (positions,): each token's own
    top_ids: np.ndarray  # (positions, top), most likely first
    top_logprobs: np.ndarray  # (positions, top)
    last: bool


def chunk_scores(logits: mx.array, following: mx.array, top: int) -> tuple[mx.array, ...]:
    """`logits` (positions, vocabulary) predict `following` (positions,): each following
    token's log probability, and the ids and log probabilities of the `top` most likely."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    own = mx.take_along_axis(logprobs, following[:, None], axis=-1)[:, 0]
    top = min(top, logprobs.shape[-1])
    if top == 0:
        empty = mx.zeros((logprobs.shape[0], 0))
        return own, empty.astype(mx.int32), empty
    ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return (
        own,
        mx.take_along_axis(ids, order, axis=-1),
        mx.take_along_axis(values, order, axis=-1),
    )


@dataclass
class PromptScoring:
    """A prompt being scored: its cache, and how many of its positions have been run."""

    op: GenerateOp
    cache: list[Any]
    top: int
    done: int = 0
    positions: int = field(init=False)  # the positions to run: all but the last token's

    def __post_init__(self) -> None:
        self.positions = len(self.op.tokens) - 1

    @property
    def finished(self) -> bool:
        return self.done >= self.positions

    def advance(self, model: nn.Module, chunk: int) -> PromptScores:
        """Run the next `chunk` positions (none when the prompt has one token) and score them."""
        tokens = self.op.tokens
        start, end = self.done, min(self.done + chunk, self.positions)
        if end > start:
            logits = model(mx.array(tokens[start:end])[None], cache=self.cache)[0]
            scores = chunk_scores(logits, mx.array(tokens[start + 1 : end + 1]), self.top)
            mx.eval([layer.state for layer in self.cache], *scores)
            own, ids, values = (np.array(score) for score in scores)
            mx.clear_cache()  # the chunk's logits: the largest buffer a step makes
        else:
            own = np.zeros((0,), np.float32)
            ids, values = np.zeros((0, self.top), np.int32), np.zeros((0, self.top), np.float32)
        self.done = end
        return PromptScores(self.op.request_id, start + 1, own, ids, values, self.finished)
