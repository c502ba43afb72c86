"""A prompt scored as it is prefilled, on one process with the tiny model: its log
probabilities are the model's own (a plain mlx-lm forward pass of the whole prompt), however
the prompt is chunked, and scoring it changes nothing of the answer that follows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from ringserve.distributed.ops import GenerateOp
from ringserve.distributed.protocol import FinishCode
from ringserve.engine.batch import BatchEngine, BatchLimits
from ringserve.engine.logprobs import prompt_logprobs, token_texts
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.engine.prompt_scores import PromptScores
from ringserve.ipc.messages import SamplingParams
from ringserve.model.demo import ensure_demo_model
from tests.families import Variant, family_model

PROMPT = [7, *range(40, 90), 5, 300, 12]
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> tuple[Any, Any]:
    model, tokenizer = load(str(ensure_demo_model(models_dir, "tiny")))[:2]
    return model, tokenizer


def reference(model: Any, tokens: list[int]) -> np.ndarray:
    """The log probabilities mlx-lm's forward pass of the whole prompt gives each position."""
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def op(tokens: list[int], top: int | None, request_id: int = 1, steps: int = 4) -> GenerateOp:
    return GenerateOp(
        request_id=request_id,
        tokens=tuple(tokens),
        sampling=SamplingParams(temperature=0.0),
        seed=0,
        max_tokens=steps,
        prompt_logprobs=top,
    )


def run(
    model: Any, ops: list[GenerateOp], chunk: int, cache: PrefixCache | None = None
) -> tuple[dict[int, list[PromptScores]], dict[int, list[int]]]:
    """The requests through one batch, to the end of each: their scored chunks, their answers."""
    engine = BatchEngine(
        model, cache or PrefixCache(model, 0), None, BatchLimits(4, chunk, prefill_sequences=2)
    )
    scores: dict[int, list[PromptScores]] = {o.request_id: [] for o in ops}
    answers: dict[int, list[int]] = {o.request_id: [] for o in ops}
    for o in ops:
        assert engine.admit(o) == 0 or o.prompt_logprobs is None
    while any(len(answers[o.request_id]) < o.max_tokens for o in ops):
        outcome = engine.step()
        for chunk_scores in outcome.scores:
            scores[chunk_scores.request_id].append(chunk_scores)
        for taken in outcome.tokens:
            # A sequence takes no token before its prompt is scored to its end.
            assert not scores[taken.request_id] or scores[taken.request_id][-1].last
            answers[taken.request_id].append(taken.token)
    for o in ops:
        engine.remove(o.request_id, FinishCode.LENGTH)
    return scores, answers


def joined(chunks: list[PromptScores]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert chunks[0].start == 1 and chunks[-1].last
    assert not any(c.last for c in chunks[:-1])
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)
    return (
        np.concatenate([c.logprobs for c in chunks]),
        np.concatenate([c.top_ids for c in chunks]),
        np.concatenate([c.top_logprobs for c in chunks]),
    )


@pytest.mark.parametrize("chunk", [16, 2048])
def test_scores_are_the_forward_pass_of_the_whole_prompt(
    loaded: tuple[Any, Any], chunk: int
) -> None:
    model, _ = loaded
    scores, _ = run(model, [op(PROMPT, top=3)], chunk)
    chunks = scores[1]
    assert len(chunks) == -(-(len(PROMPT) - 1) // chunk)  # one a chunk of all but the last
    own, ids, values = joined(chunks)
    expected = reference(model, PROMPT)[:-1]  # position i predicts token i + 1
    following = np.array(PROMPT[1:])
    np.testing.assert_allclose(own, expected[np.arange(len(following)), following], atol=TOLERANCE)
    assert ids.shape == values.shape == (len(PROMPT) - 1, 3)
    np.testing.assert_allclose(values, -np.sort(-expected, axis=-1)[:, :3], atol=TOLERANCE)
    np.testing.assert_allclose(np.take_along_axis(expected, ids, axis=-1), values, atol=TOLERANCE)


def test_scoring_leaves_the_answer_and_the_batch_as_they_were(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    other = [3, 1, 4, 1, 5, 9, 2, 6]
    _, plain = run(model, [op(PROMPT, None), op(other, None, request_id=2)], chunk=16)
    scores, scored = run(model, [op(PROMPT, 2), op(other, None, request_id=2)], chunk=16)
    assert scored == plain
    assert not scores[2]


def test_a_scored_prompt_ignores_the_cached_prefix_and_is_stored(
    loaded: tuple[Any, Any],
) -> None:
    model, _ = loaded
    cache = PrefixCache(model, budget_tokens=1000)
    first, answer = run(model, [op(PROMPT, 1)], chunk=16, cache=cache)
    assert cache.stats()["entries"] == 1  # its turn is kept for later requests
    again, answer_again = run(model, [op(PROMPT, 1)], chunk=16, cache=cache)
    assert answer_again == answer
    for a, b in zip(joined(first[1]), joined(again[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    # The stored turn serves a plain request as any other does.
    engine = BatchEngine(model, cache, None, BatchLimits(4, 16))
    assert engine.admit(op(PROMPT, None)) == len(PROMPT) - 1
    plain: list[int] = []
    while len(plain) < 4:
        plain += [taken.token for taken in engine.step().tokens]
    assert plain == answer[1]


def test_a_one_token_prompt_has_nothing_to_score(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    scores, answers = run(model, [op([42], top=2)], chunk=16)
    (chunk,) = scores[1]
    assert chunk.last and chunk.start == 1 and chunk.logprobs.shape == (0,)
    assert chunk.top_ids.shape == (0, 2)
    assert len(answers[1]) == 4
    (entry,) = prompt_logprobs(token_texts(tokenizer), [42], chunk)
    assert entry.logprob is None and entry.token == tokenizer.decode([42])


def test_the_entries_name_each_token_and_its_alternatives(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    scores, _ = run(model, [op(PROMPT, top=2)], chunk=16)
    texts = token_texts(tokenizer)
    entries = [e for chunk in scores[1] for e in prompt_logprobs(texts, PROMPT, chunk)]
    assert [e.token for e in entries] == [tokenizer.decode([t]) for t in PROMPT]
    assert entries[0].logprob is None and entries[0].top == ()
    expected = reference(model, PROMPT)
    for position, entry in enumerate(entries[1:]):
        assert entry.logprob == pytest.approx(expected[position, PROMPT[position + 1]], abs=1e-3)
        assert len(entry.top) == 2 and entry.top[0][1] >= entry.top[1][1]
        assert entry.top[0][0] == tokenizer.decode([int(np.argmax(expected[position]))])


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next", "lfm2"])
def test_other_caches_score_alike(models_dir: Path, family: str) -> None:
    """Sliding windows that rotate between chunks, recurrent and convolution states."""
    model = load(str(family_model(models_dir, Variant(family))))[0]
    scores, scored_answer = run(model, [op(PROMPT, top=2)], chunk=16)
    _, plain_answer = run(model, [op(PROMPT, None)], chunk=16)
    assert scored_answer == plain_answer
    own, _, values = joined(scores[1])
    expected = reference(model, PROMPT)[:-1]
    following = np.array(PROMPT[1:])
    np.testing.assert_allclose(own, expected[np.arange(len(following)), following], atol=TOLERANCE)
    np.testing.assert_allclose(values, -np.sort(-expected, axis=-1)[:, :2], atol=TOLERANCE)


def test_a_long_prompt_is_scored_a_chunk_a_step_while_others_decode(
    loaded: tuple[Any, Any],
) -> None:
    model, _ = loaded
    engine = BatchEngine(model, PrefixCache(model, 0), None, BatchLimits(4, 16))
    engine.admit(op([3, 1, 4], None, request_id=1, steps=64))
    while not engine.step().tokens:
        pass
    long_prompt = [(i * 37) % 900 + 20 for i in range(200)]
    engine.admit(op(long_prompt, top=1, request_id=2))
    chunks = 0
    while True:
        outcome = engine.step()
        assert [t.request_id for t in outcome.tokens] == [1]  # the other decodes every step
        (chunk,) = outcome.scores  # and the long prompt moves on by one chunk
        assert len(chunk.logprobs) <= 16
        chunks += 1
        if chunk.last:
            break
    assert chunks == -(-(len(long_prompt) - 1) // 16)
