"""Log probabilities of an echoed prompt, as evaluation harnesses ask for them, on a real 2-rank
ring in each layout: each prompt token's (the first none) with its most likely alternatives,
equal to an mlx-lm forward pass of the same prompt in this process, whether the prompt's
prefix is cached or not, over several prefill chunks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm import load

from ringserve.model.demo import ensure_demo_model
from tests.ring import Ring, running_ring

pytestmark = pytest.mark.e2e

# 50 tokens (one of them a partial character), prefilled 16 a chunk: four scored chunks.
PROMPT = [300, *range(40, 85), 400, 260, 512, 9]
PREFILL_CHUNK = 16
TOLERANCE = 1e-3


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def ring(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[Ring]:
    layout = str(request.param)
    with running_ring(
        tmp_path_factory.mktemp(f"scores-{layout}"),
        models_dir,
        parallel=layout,
        prefill_chunk=str(PREFILL_CHUNK),
    ) as ring:
        yield ring


@pytest.fixture(scope="module")
def reference(models_dir: Path) -> tuple[np.ndarray, Any]:
    """The log probabilities mlx-lm gives each position of PROMPT, and the tokenizer."""
    model, tokenizer = load(str(ensure_demo_model(models_dir, "tiny")))[:2]
    logits = model(mx.array(PROMPT)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)), tokenizer


def scored(ring: Ring, **body: Any) -> Any:
    client: Any = ring.client()
    return client.completions.create(
        model="ringserve-tiny", prompt=PROMPT, temperature=0, echo=True, **body
    )


def check_prompt_entries(logprobs: Any, reference: tuple[np.ndarray, Any], top: int) -> None:
    """The first len(PROMPT) entries are the prompt's, as the forward pass scores it."""
    expected, tokenizer = reference
    count = len(PROMPT)
    assert logprobs.tokens[:count] == [tokenizer.decode([t]) for t in PROMPT]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, count):
        position = expected[i - 1]  # predicts token i
        assert logprobs.token_logprobs[i] == pytest.approx(position[PROMPT[i]], abs=TOLERANCE)
        alternatives = logprobs.top_logprobs[i]
        if not top:
            assert alternatives == {}
            continue
        best = [int(b) for b in np.argsort(-position)[:top]]
        assert 1 <= len(alternatives) <= top  # keyed by text: two alike share a key
        assert max(alternatives.values()) == pytest.approx(position[best[0]], abs=TOLERANCE)
        for text, value in alternatives.items():
            # Of the likeliest tokens, the likeliest that reads so.
            same_text = [b for b in best if tokenizer.decode([b]) == text]
            assert same_text and value == pytest.approx(position[same_text[0]], abs=TOLERANCE)


def test_an_echoed_prompt_is_scored_as_the_model_scores_it(
    ring: Ring, reference: tuple[np.ndarray, Any]
) -> None:
    expected, tokenizer = reference
    likeliest = int(expected[-1].argmax())
    assert likeliest not in tokenizer.eos_token_ids  # the answer has a first token
    answer = scored(ring, logprobs=3, max_tokens=2)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    check_prompt_entries(logprobs, reference, top=3)
    generated = answer.usage.completion_tokens
    assert len(logprobs.tokens) == len(PROMPT) + generated == len(logprobs.token_logprobs)
    # Then the answer's own entries: greedy, its first token is the last position's likeliest.
    first = logprobs.token_logprobs[len(PROMPT)]
    assert first == pytest.approx(expected[-1].max(), abs=TOLERANCE)
    assert logprobs.tokens[len(PROMPT)] == tokenizer.decode([likeliest])
    prompt_text = tokenizer.decode(PROMPT)
    assert choice.text.startswith(prompt_text)
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    assert answer.usage.prompt_tokens == len(PROMPT)

    # Streamed: the same entries, the prompt's first.
    client: Any = ring.client()
    stream = client.completions.create(
        model="ringserve-tiny",
        prompt=PROMPT,
        temperature=0,
        echo=True,
        logprobs=3,
        max_tokens=2,
        stream=True,
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    streamed_tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    streamed_values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed_tokens[: len(PROMPT)] == logprobs.tokens[: len(PROMPT)]
    assert streamed_values[: len(PROMPT)] == logprobs.token_logprobs[: len(PROMPT)]
    assert "".join(c.text for c in chunks).startswith(prompt_text)


def test_a_cached_prefix_is_scored_afresh(ring: Ring, reference: tuple[np.ndarray, Any]) -> None:
    first = scored(ring, logprobs=1, max_tokens=1)
    # The prefix cache now holds the prompt: a plain request reuses it...
    client: Any = ring.client()
    plain = client.completions.create(
        model="ringserve-tiny", prompt=PROMPT, temperature=0, max_tokens=1
    )
    assert plain.usage.prompt_tokens_details.cached_tokens == len(PROMPT) - 1
    # ...and a scored one computes every position again, to the same numbers.
    again = scored(ring, logprobs=1, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    check_prompt_entries(again.choices[0].logprobs, reference, top=1)
    assert again.choices[0].logprobs == first.choices[0].logprobs


def test_no_tokens_asked_for_gives_the_prompt_alone(
    ring: Ring, reference: tuple[np.ndarray, Any]
) -> None:
    """What lm-evaluation-harness sends for a loglikelihood: prompts as token ids, echo,
    logprobs, max_tokens 0."""
    _, tokenizer = reference
    body = {
        "model": "m",
        "prompt": [PROMPT, PROMPT[:5]],
        "echo": True,
        "logprobs": 1,
        "max_tokens": 0,
        "temperature": 0,
    }
    with ring.http() as http:
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    whole, short = sorted(reply.json()["choices"], key=lambda c: c["index"])
    assert whole["text"] == tokenizer.decode(PROMPT) and whole["finish_reason"] == "length"
    assert len(whole["logprobs"]["tokens"]) == len(PROMPT)
    assert short["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:5]
    assert short["logprobs"]["token_logprobs"][1:] == pytest.approx(
        whole["logprobs"]["token_logprobs"][1:5], abs=TOLERANCE
    )
    assert reply.json()["usage"]["completion_tokens"] == 0

    # Alternatives of none: each token's own log probability, and an empty list beside it.
    zero = scored(ring, logprobs=0, max_tokens=0).choices[0].logprobs
    check_prompt_entries(zero, reference, top=0)
    assert zero.top_logprobs[1:] == [{}] * (len(PROMPT) - 1)
    with ring.http() as http:
        refused = http.post("/v1/completions", json={**body, "echo": False})
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]


def test_logprobs_zero_gives_each_answer_tokens_own(ring: Ring) -> None:
    client: Any = ring.client()
    answer = client.completions.create(
        model="m", prompt="The ring", max_tokens=4, temperature=0, logprobs=0
    )
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == answer.usage.completion_tokens
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert logprobs.top_logprobs == [{}] * len(logprobs.tokens)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="m", prompt="The ring", echo=True, logprobs=6)
