"""The sequences a rank is generating, batched by mlx-lm's BatchGenerator.

Every rank holds one of these and applies the same ticks to it in the same order, so every
rank's generator holds the same sequences and runs the same steps (the model's collectives
pair up). Sequences come from the prefix cache and go back to it; only rank 0's removals take
a sequence out (the generator is never given a reason to drop one on its own: no stop tokens,
and room for one token more than the request may have).

A prompt whose log probabilities were asked for is scored as it is prefilled (see
prompt_scores): chunk by chunk, up to `prefill_sequences` such prompts a step, outside the
generator, which it joins once scored, as a prefix-cache hit of all but its last token does.
It never reuses a cached prefix: the logits of every position are needed, and a cached prefix
holds only its keys and values, so it is computed afresh (its turn is stored when it ends).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor

from ringserve.distributed.ops import GenerateOp
from ringserve.distributed.protocol import FinishCode
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.engine.prefix_index import Owner
from ringserve.engine.prompt_scores import PromptScores, PromptScoring
from ringserve.engine.sampling import logits_processors_for, sampler_for
from ringserve.engine.structure import Grammars
from ringserve.ipc.messages import SamplingParams

log = logging.getLogger(__name__)
# The warm-up's sequence: never a request's id (those count from 1), and the tokens it may
# take (more than its steps take: the generator never ends it on its own).
WARM_UP_ID = -1
WARM_UP_TOKENS = 16


@dataclass(frozen=True)
class BatchLimits:
    max_sequences: int  # sequences decoding together
    prefill_chunk: int  # tokens of one prompt a step prefills at most
    prefill_sequences: int = 8  # prompts prefilled together: a step prefills at most this many
    # chunks, which bounds how long the decoding streams stall


@dataclass(frozen=True)
class StepToken:
    """A token a sequence took in a step, and the distribution it was drawn from (after the
    logits processors, before temperature)."""

    request_id: int
    token: int
    logprobs: mx.array


@dataclass(frozen=True)
class StepOutcome:
    """What a step did: the tokens the sequences took, and the prompt chunks it scored."""

    tokens: list[StepToken]
    scores: list[PromptScores]


@dataclass
class _Sequence:
    uid: int | None  # None while its prompt is being scored, before it joins the generator
    op: GenerateOp


class BatchEngine:
    def __init__(
        self,
        model: nn.Module,
        prefix_cache: PrefixCache,
        grammars: Grammars | None,
        limits: BatchLimits,
        stream: Any = None,
        on_prefill_chunk: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        self.grammars = grammars
        self.limits = limits
        self.stream = stream
        self.on_prefill_chunk = on_prefill_chunk
        self.sequences: dict[int, _Sequence] = {}
        self._decoding: set[int] = set()  # the sequences that have taken a token
        self._scoring: dict[int, PromptScoring] = {}  # by request id, in admission order
        self.generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            completion_batch_size=self.limits.max_sequences,
            prefill_batch_size=min(self.limits.prefill_sequences, self.limits.max_sequences),
            prefill_step_size=self.limits.prefill_chunk,
            stream=self.stream,
        )

    @property
    def active(self) -> bool:
        return bool(self.sequences)

    @property
    def prefilling(self) -> bool:
        """Whether a sequence's prompt is still being prefilled (the next step has a chunk)."""
        return len(self._decoding) < len(self.sequences)

    def admit(self, op: GenerateOp) -> int:
        """Start a sequence; returns how many of its prompt tokens the prefix cache supplied."""
        if op.prompt_logprobs is not None:
            scoring = PromptScoring(op, make_prompt_cache(self.model), op.prompt_logprobs)
            self._scoring[op.request_id] = scoring
            self.sequences[op.request_id] = _Sequence(None, op)
            return 0
        owner = Owner(op.cache_scope, op.conversation_id)
        prompt, cache, reused = self.prefix_cache.checkout(op.tokens, owner)
        self.sequences[op.request_id] = _Sequence(self._insert(op, prompt, cache, reused), op)
        return reused

    def _insert(self, op: GenerateOp, prompt: list[int], cache: list[Any], reused: int) -> int:
        """Into the generator: `cache` holds the first `reused` tokens, `prompt` the rest."""
        (uid,) = self.generator.insert(
            [prompt],
            max_tokens=[op.max_tokens + 1],
            caches=[cache],
            all_tokens=[list(op.tokens[:reused])],
            samplers=[sampler_for(op.sampling, op.seed)],
            logits_processors=[self._processors(op)],
        )
        return int(uid)

    def _processors(self, op: GenerateOp) -> list[LogitsProcessor]:
        processors = logits_processors_for(op.sampling)
        if op.grammar is not None:
            if self.grammars is None:
                raise ValueError("a constrained request on a batch without grammars")
            processors.append(self.grammars.processor(op.grammar))  # last: nothing undoes it
        return processors

    def remove(self, request_id: int, code: FinishCode) -> None:
        """Take a sequence out; a finished one (not cancelled, not failed) leaves its turn,
        prompt and answer, to the prefix cache."""
        sequence = self.sequences.pop(request_id, None)
        self._decoding.discard(request_id)
        self._scoring.pop(request_id, None)
        if sequence is None:
            return
        owner = Owner(sequence.op.cache_scope, sequence.op.conversation_id)
        if sequence.uid is None:  # still being scored
            self.prefix_cache.discard(len(sequence.op.tokens), owner)
            return
        keep = code in (FinishCode.STOP, FinishCode.LENGTH) and self.prefix_cache.enabled
        caches = self.generator.remove([sequence.uid], return_prompt_caches=keep)
        if keep and sequence.uid in caches:
            cache, tokens = caches[sequence.uid]
            # Extracted lazily from the batch: evaluated now, or it keeps the whole batch's
            # KV buffers alive for as long as it is stored.
            mx.eval([layer.state for layer in cache])
            self.prefix_cache.store(tokens, cache, owner)
        else:
            self.prefix_cache.discard(len(sequence.op.tokens), owner)

    def step(self) -> StepOutcome:
        """One engine step: a chunk of the prompts being scored, then a decode step of every
        decoding sequence and a prefill chunk of prompts waiting (at most `prefill_chunk`
        tokens a prompt)."""
        scores = self._score_prompts()
        prompt_progress, generated = self.generator.next()
        if prompt_progress and self.on_prefill_chunk is not None:
            self.on_prefill_chunk()
        by_uid = {s.uid: request_id for request_id, s in self.sequences.items()}
        taken = [
            StepToken(by_uid[r.uid], int(r.token), r.logprobs) for r in generated if r.uid in by_uid
        ]
        self._decoding.update(t.request_id for t in taken)
        return StepOutcome(taken, scores)

    def _score_prompts(self) -> list[PromptScores]:
        """A chunk of each of the first `prefill_sequences` prompts being scored; a prompt
        scored to its end joins the generator (all but its last token in its cache)."""
        scores = []
        for request_id in list(self._scoring)[: self.limits.prefill_sequences]:
            scoring = self._scoring[request_id]
            with mx.stream(self.generator.stream):
                scores.append(scoring.advance(self.model, self.limits.prefill_chunk))
            if self.on_prefill_chunk is not None:
                self.on_prefill_chunk()
            if scoring.finished:
                del self._scoring[request_id]
                op = scoring.op
                uid = self._insert(op, list(op.tokens[-1:]), scoring.cache, len(op.tokens) - 1)
                self.sequences[request_id].uid = uid
        return scores

    def start_warm_up(self) -> None:
        """A throwaway sequence of one prompt chunk, greedy, outside the prefix cache: the
        same on every rank (see RankLoop.warm_up)."""
        prompt = [0] * self.limits.prefill_chunk
        (uid,) = self.generator.insert(
            [prompt],
            max_tokens=[WARM_UP_TOKENS + 1],
            caches=[make_prompt_cache(self.model)],
            samplers=[sampler_for(SamplingParams(temperature=0.0), 0)],
            logits_processors=[[]],
        )
        op = GenerateOp(
            request_id=WARM_UP_ID,
            tokens=tuple(prompt),
            sampling=SamplingParams(temperature=0.0),
            seed=0,
            max_tokens=WARM_UP_TOKENS,
        )
        self.sequences[WARM_UP_ID] = _Sequence(uid, op)

    def end_warm_up(self) -> None:
        sequence = self.sequences.pop(WARM_UP_ID)
        self._decoding.discard(WARM_UP_ID)
        self.generator.remove([sequence.uid])

    def drop_all(self) -> list[int]:
        """After a failure: every sequence goes, and the prefix cache's entries with them (after
        a failure on one rank alone, the ranks' sequences and entries may differ); the generator
        starts afresh. Returns the requests that were running."""
        dropped = list(self.sequences)
        self.sequences.clear()
        self._decoding.clear()
        self._scoring.clear()
        self.prefix_cache.clear()
        self.generator.close()
        self.generator = self._new_generator()
        return dropped
