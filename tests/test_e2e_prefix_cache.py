"""A chat client on a 2-rank ring with a prefix cache gets the same answers as on a cold ring,
with cached tokens reported, and both ranks make the same cache decisions.

One caching ring (a small budget, so evictions happen) and one cold reference ring (budget 0)
serve the whole file; temperature 0 on the float32 tiny model makes answers comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from tests.ring import Ring, rings_together, running_ring

pytestmark = pytest.mark.e2e

BUDGET = 700
SYSTEM = {"role": "system", "content": "You are a careful assistant who answers briefly."}


@dataclass(frozen=True)
class Answer:
    text: str
    completion_tokens: int
    cached_tokens: int
    prompt_tokens: int


@pytest.fixture(scope="module")
def rings(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[Ring, Ring]]:
    root = tmp_path_factory.mktemp("prefix")
    with rings_together(
        running_ring(
            root / "warm",
            models_dir,
            prefix_cache_tokens=str(BUDGET),
            prefix_cache_disk_bytes="0",  # RAM alone: tests/test_e2e_prefix_disk.py has disk
        ),
        running_ring(root / "cold", models_dir, prefix_cache_tokens="0"),
    ) as (warm, cold):
        yield warm, cold


@pytest.fixture(scope="module")
def warm(rings: tuple[Ring, Ring]) -> Ring:
    return rings[0]


def chat(
    ring: Ring,
    messages: list[dict[str, str]],
    conversation: str | None = None,
    sampling: dict[str, Any] | None = None,
) -> Answer:
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, **(sampling or {})}
    with ring.http() as http:
        reply = http.post("/v1/chat/completions", json=body, headers=headers)
    reply.raise_for_status()
    data = reply.json()
    usage = data["usage"]
    return Answer(
        data["choices"][0]["message"]["content"],
        usage["completion_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
        usage["prompt_tokens"],
    )


def warm_and_cold(
    rings: tuple[Ring, Ring],
    messages: list[dict[str, str]],
    conversation: str | None = None,
    sampling: dict[str, Any] | None = None,
) -> Answer:
    """The caching ring's answer, checked against the cold ring's token for token."""
    with ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(chat, ring, messages, conversation, sampling) for ring in rings]
    answer, reference = (reply.result() for reply in replies)
    assert reference.cached_tokens == 0
    assert (answer.text, answer.completion_tokens) == (reference.text, reference.completion_tokens)
    return answer


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def cache_stats(ring: Ring) -> dict[str, Any]:
    with ring.http() as http:
        return http.get("/model/info").json()["prefix_cache"]


def stats_when(ring: Ring, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The cache stats once `condition` holds (the ranks see a cancel a few steps later)."""
    deadline = time.monotonic() + 30
    while not condition(stats := cache_stats(ring)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stats


def test_a_cold_start_reports_no_cached_tokens(warm: Ring) -> None:
    with warm.http() as http:
        body = {"prompt": "Quartz zebras never share a prefix", "max_tokens": 4, "temperature": 0}
        usage = http.post("/v1/completions", json=body).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_an_exact_repeat_reuses_all_but_the_last_token(rings: tuple[Ring, Ring]) -> None:
    messages = [SYSTEM, user("Describe a lighthouse at dusk in a few words.")]
    warm_and_cold(rings, messages)
    repeat = warm_and_cold(rings, messages)
    assert repeat.cached_tokens == repeat.prompt_tokens - 1


def test_an_extended_conversation_reuses_the_previous_turn(rings: tuple[Ring, Ring]) -> None:
    turn1 = [SYSTEM, user("What is a ring of machines?")]
    first = warm_and_cold(rings, turn1, "extend")
    turn2 = [*turn1, assistant(first.text), user("And why would one cache prefixes?")]
    second = warm_and_cold(rings, turn2, "extend")
    assert second.cached_tokens >= first.prompt_tokens


def test_penalties_see_the_cached_prompt_as_a_cold_run_does(
    rings: tuple[Ring, Ring], models_dir: Path
) -> None:
    # The repetition penalty looks back 20 tokens. On a repeat the warm ring prefills only the
    # last prompt token, so the rest of that window is in the cache. Token `x` sits in the
    # window: pushed to the top by its bias, it is only held back if the penalty sees it.
    messages = [SYSTEM, user("Describe a harbour in the fog.")]
    tokenizer = load_tokenizer(models_dir / "ringserve-tiny")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    x = next(t for t in reversed(prompt[-20:-1]) if t != prompt[-1])
    sampling = {"logit_bias": {str(x): 100.0}, "repetition_penalty": 10.0}
    cold = warm_and_cold(rings, messages, "penalties", sampling)
    assert cold.prompt_tokens == len(prompt)
    warm = warm_and_cold(rings, messages, "penalties", sampling)
    assert warm.cached_tokens == warm.prompt_tokens - 1


def test_a_conversation_that_diverges_midway(rings: tuple[Ring, Ring]) -> None:
    turn1 = [SYSTEM, user("Name three rivers."), assistant("Nile, Amazon, Danube.")]
    first = warm_and_cold(rings, [*turn1, user("Which is longest?")], "diverge")
    edited = [SYSTEM, user("Name three mountains."), assistant("Everest, K2, Denali.")]
    second = warm_and_cold(rings, [*edited, user("Which is highest?")], "diverge")
    assert 0 < second.cached_tokens < first.prompt_tokens


def test_two_interleaved_conversations(rings: tuple[Ring, Ring]) -> None:
    a1 = [SYSTEM, user("Tell me about owls.")]
    b1 = [SYSTEM, user("Tell me about whales.")]
    first_a = warm_and_cold(rings, a1, "owls")
    first_b = warm_and_cold(rings, b1, "whales")
    second_a = warm_and_cold(
        rings, [*a1, assistant(first_a.text), user("Where do they live?")], "owls"
    )
    second_b = warm_and_cold(
        rings, [*b1, assistant(first_b.text), user("What do they eat?")], "whales"
    )
    assert second_a.cached_tokens >= first_a.prompt_tokens
    assert second_b.cached_tokens >= first_b.prompt_tokens


def test_an_evicted_conversation_is_recomputed_correctly(rings: tuple[Ring, Ring]) -> None:
    warm, _ = rings
    messages = [SYSTEM, user("Remember the word marmalade.")]
    first = warm_and_cold(rings, messages, "evicted")
    evictions = cache_stats(warm)["evictions"]
    for i in range(4):
        filler = "The quick brown fox jumps over the lazy dog. " * 12
        warm_and_cold(rings, [SYSTEM, user(f"Filler {i}: {filler}")], f"filler-{i}")
    stats = cache_stats(warm)
    assert stats["evictions"] > evictions and stats["tokens"] <= BUDGET
    again = warm_and_cold(rings, messages, "evicted")
    assert again.cached_tokens < first.prompt_tokens - 1


def test_a_client_that_leaves_mid_turn_leaves_the_cache_correct(rings: tuple[Ring, Ring]) -> None:
    warm, _ = rings
    messages = [SYSTEM, user("Write a long story about a patient gardener.")]
    warm_and_cold(rings, messages, "leaver")
    before = cache_stats(warm)
    body = {"messages": messages, "max_tokens": 400, "temperature": 0, "stream": True}
    with (
        warm.http() as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Conversation-Id": "leaver"}
        ) as reply,
    ):
        chunks = 0
        for line in reply.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 2:
                break
    after = stats_when(warm, lambda stats: stats["discards"] > before["discards"])
    assert after["hits"] == before["hits"] + 1
    assert after["discards"] == before["discards"] + 1  # the cancelled turn was not stored
    again = warm_and_cold(rings, messages, "leaver")
    assert again.cached_tokens == again.prompt_tokens - 1


def test_both_ranks_made_the_same_decisions(warm: Ring) -> None:
    with warm.http() as http:
        ranks = http.get("/gpu/info", timeout=60).json()["ranks"]
    first, second = (rank["prefix_cache"] for rank in ranks)
    assert first == second
    assert first["hits"] > 0 and first["misses"] > 0 and first["evictions"] > 0
    info = cache_stats(warm)
    assert {k: info[k] for k in first} == first
