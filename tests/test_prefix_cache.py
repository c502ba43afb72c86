"""The prefix cache on one process with the tiny model: reuse gives the cold answer, and a hit
never changes the stored entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlx_lm import load

from ringserve.distributed.ops import GenerateOp
from ringserve.distributed.protocol import FinishCode
from ringserve.engine.batch import BatchEngine, BatchLimits
from ringserve.engine.prefix_cache import PrefixCache, cache_length
from ringserve.ipc.messages import SamplingParams
from ringserve.model.demo import ensure_demo_model

PROMPT = list(range(40, 90))


@pytest.fixture(scope="module")
def model(models_dir: Path) -> Any:
    return load(str(ensure_demo_model(models_dir, "tiny")))[0]


def run(
    model: Any,
    cache: PrefixCache,
    tokens: list[int],
    steps: int,
    *,
    store: bool = True,
    scope: str = "",
) -> tuple[list[int], int]:
    """One request through a batch of its own: `steps` greedy tokens, then out of the batch
    (its turn stored in the prefix cache when `store`), under the API key scope `scope`."""
    engine = BatchEngine(model, cache, None, BatchLimits(max_sequences=4, prefill_chunk=2048))
    op = GenerateOp(
        request_id=1,
        tokens=tuple(tokens),
        sampling=SamplingParams(temperature=0.0),
        seed=0,
        max_tokens=steps,
        cache_scope=scope,
    )
    cached = engine.admit(op)
    answer: list[int] = []
    while len(answer) < steps:
        answer += [taken.token for taken in engine.step().tokens]
    engine.remove(1, FinishCode.LENGTH if store else FinishCode.CANCELLED)
    return answer, cached


def snapshot(cache: list[Any]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    out = []
    for layer in cache:
        keys, values, _ = layer.state
        out.append((layer.offset, np.array(keys), np.array(values)))
    return out


def test_a_stored_turn_holds_exactly_its_prompt_and_answer(model: Any) -> None:
    cache = PrefixCache(model, budget_tokens=1000)
    answer, cached = run(model, cache, PROMPT, steps=6)
    assert cached == 0
    (entry,) = cache.index.entries.values()
    assert entry.tokens == (*PROMPT, *answer)
    assert cache_length(cache.caches[entry.key]) == len(PROMPT) + 6


def test_warm_answers_equal_cold_ones(model: Any) -> None:
    warm = PrefixCache(model, budget_tokens=1000)
    first, _ = run(model, warm, PROMPT, steps=5)
    follow_up = [*PROMPT, *first, 7, 8, 9]
    for tokens, expected_cached in ((follow_up, len(follow_up) - 3), (PROMPT, len(PROMPT) - 1)):
        cold, _ = run(model, PrefixCache(model, 0), tokens, steps=8)
        answer, cached = run(model, warm, tokens, steps=8)
        assert answer == cold
        assert cached == expected_cached


def test_a_diverging_hit_leaves_the_stored_entry_unchanged(model: Any) -> None:
    cache = PrefixCache(model, budget_tokens=1000)
    run(model, cache, PROMPT, steps=4)
    (key,) = cache.caches
    before = snapshot(cache.caches[key])
    diverging = [*PROMPT[:20], 3, 2, 1]
    _, cached = run(model, cache, diverging, steps=12, store=False)
    assert cached == 20
    after = snapshot(cache.caches[key])
    assert len(before) == len(after)
    for (offset_a, keys_a, values_a), (offset_b, keys_b, values_b) in zip(
        before, after, strict=True
    ):
        assert offset_a == offset_b
        assert np.array_equal(keys_a, keys_b) and np.array_equal(values_a, values_b)
    cold, _ = run(model, PrefixCache(model, 0), PROMPT, steps=6)
    warm, cached = run(model, cache, PROMPT, steps=6)
    assert warm == cold and cached == len(PROMPT) - 1


def test_a_disabled_cache_never_reuses(model: Any) -> None:
    cache = PrefixCache(model, budget_tokens=0)
    run(model, cache, PROMPT, steps=3)
    _, cached = run(model, cache, PROMPT, steps=3)
    assert cached == 0 and not cache.caches


def test_the_budget_counts_the_positions_each_entry_holds(model: Any) -> None:
    # A turn leaves the batch as a cache of exactly its positions (no spare allocation).
    cache = PrefixCache(model, budget_tokens=150)
    run(model, cache, PROMPT, steps=6)
    assert cache.stats()["tokens"] == cache.stats()["slots"] == len(PROMPT) + 6
    run(model, cache, [5, *PROMPT[1:]], steps=6)
    assert cache.stats()["entries"] == 2
    # A third 56-position turn does not fit beside two others in 150: the oldest goes.
    run(model, cache, [6, *PROMPT[1:]], steps=6)
    assert (cache.stats()["entries"], cache.stats()["evictions"]) == (2, 1)
