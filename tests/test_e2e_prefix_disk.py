"""Conversations outlive RAM and restarts: the prefix cache's disk tier on real 2-rank rings.

Two rings serve the file, started together:
- a tensor ring of the tiny model, KV as computed (bits 0), with room in RAM for a few turns
  and on disk for a few more: a turn pushed out of RAM comes back from disk, the disk budget
  holds, and after `stop` + `start` a conversation resumes warm, under its own key only, while
  a truncated file and a file another model made are removed;
- a pipeline ring of a llama-family model with heads 32 wide, its stored KV quantized to 8 bits:
  a conversation resumes warm after `restart`.
Answers are greedy; a cold answer for comparison is the same request under another API key
(another scope, so nothing is reused).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.families import Variant, family_model
from tests.ring import Ring, launch, rings_together, running_ring

pytestmark = pytest.mark.e2e

RAM_TOKENS = 150
DISK_BYTES = 200_000
SYSTEM = {"role": "system", "content": "You are a careful assistant who answers briefly."}


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    cached_tokens: int


@pytest.fixture(scope="module")
def rings(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[Ring]]:
    root = tmp_path_factory.mktemp("prefix-disk")
    quantizable = family_model(models_dir, Variant("llama", scale=2))
    with rings_together(
        running_ring(
            root / "tensor",
            models_dir,
            parallel="tensor",
            prefix_cache_tokens=str(RAM_TOKENS),
            prefix_cache_disk_bytes=str(DISK_BYTES),
        ),
        running_ring(
            root / "pipeline",
            models_dir,
            model=str(quantizable),
            parallel="pipeline",
            kv_bits="8",
            kv_group_size="32",
        ),
    ) as started:
        yield started


def chat(ring: Ring, messages: list[dict[str, str]], key: str, conversation: str) -> Answer:
    headers = {"Authorization": f"Bearer {key}", "X-Conversation-Id": conversation}
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    with ring.http() as http:
        reply = http.post("/v1/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    return Answer(
        data["choices"][0]["message"]["content"],
        data["usage"]["prompt_tokens"],
        data["usage"]["prompt_tokens_details"]["cached_tokens"],
    )


def turn(
    ring: Ring, messages: list[dict[str, str]], conversation: str, key: str = "first"
) -> tuple[Answer, list[dict[str, str]]]:
    """One turn of a conversation: the answer, and the messages with it appended."""
    answer = chat(ring, messages, key, conversation)
    return answer, [*messages, {"role": "assistant", "content": answer.text}]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def stats(ring: Ring) -> dict[str, Any]:
    with ring.http() as http:
        cache: dict[str, Any] = http.get("/model/info").json()["prefix_cache"]
    return cache


def prefix_metrics(ring: Ring) -> dict[str, float]:
    with ring.http() as http:
        text = http.get("/metrics").text
    rows = [line.rsplit(" ", 1) for line in text.splitlines()]
    return {row[0]: float(row[1]) for row in rows if row[0].startswith("ringserve_prefix_cache")}


def rank_dirs(ring: Ring) -> list[Path]:
    return [ring.run_dir / "prefix-cache" / f"rank{rank}" for rank in (0, 1)]


def entry_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def disk_use(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def same_decisions(ring: Ring) -> None:
    first, second = (report["prefix_cache"] for report in ring.rank_reports())
    assert first["digest"] == second["digest"]
    assert first["disk_entries"] == second["disk_entries"]


def test_a_pipeline_with_8_bit_kv_resumes_a_conversation_after_restart(rings: list[Ring]) -> None:
    ring = rings[1]
    first, messages = turn(ring, [SYSTEM, user("Tell me about tides.")], "tides")
    second, messages = turn(ring, [*messages, user("Why twice a day?")], "tides")
    assert second.cached_tokens >= first.prompt_tokens
    ring.launch("restart")
    third, _ = turn(ring, [*messages, user("And the moon?")], "tides")
    assert third.cached_tokens >= second.prompt_tokens
    after = stats(ring)
    assert (after["disk_hits"], after["ram_hits"]) == (1, 0)
    same_decisions(ring)
    # Each rank keeps its 2 layers' 2 KV heads of 32: 1024 bytes a token in float32, 320 at
    # 8 bits (a byte a value, and a float32 scale and bias per 32), beside the other layers'
    # placeholders (16 bytes).
    for report in ring.rank_reports():
        held = report["prefix_cache_bytes"]["ram_bytes"] / report["prefix_cache"]["tokens"]
        assert held == 320 + 16


def test_a_tensor_ring_keeps_conversations_on_disk_within_budget_and_across_restart(
    rings: list[Ring],
) -> None:
    ring, other_model = rings
    # 1. A stream of conversations: RAM spills to disk, disk evicts, and stays within budget.
    for i in range(8):
        turn(ring, [SYSTEM, user(f"Count to {i + 3} in words, please.")], f"stream-{i}")
        for directory in rank_dirs(ring):
            assert disk_use(directory) <= DISK_BYTES
    streamed = stats(ring)
    assert streamed["tokens"] <= RAM_TOKENS and streamed["disk_bytes"] <= DISK_BYTES
    assert streamed["spills"] > 0 and streamed["evictions"] > 0
    # 2. A conversation pushed out of RAM by others comes back from disk, answering as cold.
    kept, kept_messages = turn(ring, [SYSTEM, user("Remember the word marmalade.")], "kept")
    for i in range(3):
        turn(ring, [SYSTEM, user(f"Name {i + 2} colours.")], f"filler-{i}")
    follow_up = [*kept_messages, user("Which word?")]
    before = stats(ring)
    warm = chat(ring, follow_up, "first", "kept")
    assert warm.cached_tokens >= kept.prompt_tokens
    assert stats(ring)["disk_hits"] == before["disk_hits"] + 1
    assert warm.text == chat(ring, follow_up, "cold-1", "kept").text
    scraped = prefix_metrics(ring)
    assert scraped["ringserve_prefix_cache_disk_hits_total"] == stats(ring)["disk_hits"]
    assert 0 < scraped["ringserve_prefix_cache_disk_bytes"] <= DISK_BYTES
    assert scraped["ringserve_prefix_cache_ram_bytes"] > 0
    kept_messages = [*follow_up, {"role": "assistant", "content": warm.text}]
    # 3. A last conversation, whose file rank 1 will lose; the ranks agree on what they hold.
    damaged, damaged_messages = turn(ring, [SYSTEM, user("Name a blue fruit.")], "damaged")
    same_decisions(ring)
    ring.launch("stop")
    newest = entry_files(rank_dirs(ring)[1])[-1]
    with newest.open("r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    turn(other_model, [SYSTEM, user("Say hi.")], "elsewhere")
    foreign = entry_files(rank_dirs(other_model)[0])[0]
    shutil.copy(foreign, rank_dirs(ring)[0] / foreign.name)
    # 4. A KV format the model cannot take is refused in one line, and leaves the files be.
    refused = launch({**ring.env, "RINGSERVE_KV_BITS": "8"}, "start", check=False)
    assert refused.returncode != 0
    assert "RINGSERVE_KV_GROUP_SIZE=64, but this model's KV heads are 16 wide" in refused.stderr
    ring.launch("stop")
    assert (rank_dirs(ring)[0] / foreign.name).exists()
    # 5. After a start, the damaged and foreign files are gone, the kept conversation is warm.
    ring.launch("start")
    assert not (rank_dirs(ring)[0] / foreign.name).exists() and not newest.exists()
    logs = [(ring.run_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert "1 made for another model, layout, rank or KV format" in logs[0]
    assert "removed 1 entries not every rank holds" in logs[0]
    assert "1 unreadable or truncated" in logs[1]
    again = [*kept_messages, user("Spell it.")]
    resumed = chat(ring, again, "first", "kept")
    assert resumed.cached_tokens >= warm.prompt_tokens
    # 6. Under another key it is not reused (scope is kept on disk), and answers the same.
    cold = chat(ring, again, "cold-2", "kept")
    assert cold.cached_tokens == 0 and resumed.text == cold.text
    # 7. The conversation rank 1 lost is not reused on either rank.
    lost = chat(ring, [*damaged_messages, user("Why?")], "first", "damaged")
    assert lost.cached_tokens < damaged.prompt_tokens
    same_decisions(ring)
