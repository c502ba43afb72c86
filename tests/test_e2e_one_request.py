"""One request must not slow everyone: while a hostile or careless request is refused or served,
another key's stream keeps taking tokens, and nothing answers a 500.

A 2-rank demo ring with two keys and a context of 32k tokens (so megabyte prompts are within
the byte bounds and reach rank 0)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringserve.ipc.bounds import MAX_STOP_CHARS
from tests.ring import Ring, no_eos, running_ring, within

pytestmark = pytest.mark.e2e

KEYS = ("key-one", "key-two")
BATCH = 16
HELLO = [{"role": "user", "content": "Tell me about the ring of machines."}]


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    run = tmp_path_factory.mktemp("one-request")
    with running_ring(
        run, models_dir, api_key=",".join(KEYS), context_limit="32768", batch_size=str(BATCH)
    ) as ring:
        yield ring


def post(ring: Ring, path: str, body: dict[str, Any], key: str = KEYS[0]) -> httpx.Response:
    with httpx.Client(base_url=ring.url, timeout=120) as http:
        return http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


class LongStream:
    """A long greedy stream of `key` (EOS forbidden), read in a thread until `leave()` (its
    client then goes away): when each of its chunks came. As a context manager, it is
    decoding when entered and left on exit."""

    def __init__(self, ring: Ring, models_dir: Path, key: str) -> None:
        self.arrivals: list[float] = []
        body = {
            "messages": HELLO,
            "max_tokens": 4000,
            "temperature": 0,
            "stream": True,
            "logit_bias": no_eos(models_dir / "ringserve-tiny"),
        }
        self.left = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(ring, body, key), daemon=True)
        self.thread.start()

    def _read(self, ring: Ring, body: dict[str, Any], key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with (
            httpx.Client(base_url=ring.url, timeout=120) as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply,
        ):
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    self.arrivals.append(time.monotonic())
                if self.left.is_set():
                    return

    def leave(self) -> None:
        self.left.set()
        self.thread.join(60)

    def __enter__(self) -> LongStream:
        assert within(60, lambda: len(self.arrivals) >= 5), "the stream never started decoding"
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def during(self, action: Callable[[], Any]) -> tuple[Any, int]:
        """`action`'s result, and how many tokens the stream took while it ran."""
        started = time.monotonic()
        result = action()
        ended = time.monotonic()
        return result, sum(started <= t <= ended for t in self.arrivals)


def concurrently(count: int, action: Callable[[], httpx.Response]) -> list[httpx.Response]:
    replies: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: replies.append(action())) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return replies


def test_a_stop_string_longer_than_the_bound_is_a_400(ring: Ring) -> None:
    long = "x" * (MAX_STOP_CHARS + 1)
    reply = post(ring, "/v1/chat/completions", {"messages": HELLO, "stop": [long, "y"]})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "stop"
    body = {"model": "m", "max_tokens": 4, "messages": HELLO, "stop_sequences": [long]}
    reply = post(ring, "/v1/messages", body)
    assert reply.status_code == 400 and reply.json()["type"] == "error", reply.text


def test_a_flood_of_counts_past_the_context_is_refused_while_another_stream_goes_on(
    ring: Ring, models_dir: Path
) -> None:
    huge = {"model": "m", "messages": [{"role": "user", "content": "word " * 190_000}]}
    with LongStream(ring, models_dir, KEYS[1]) as pace:
        replies, taken = pace.during(
            lambda: concurrently(8, lambda: post(ring, "/v1/messages/count_tokens", huge))
        )
    assert [r.status_code for r in replies] == [400] * 8, [r.text[:200] for r in replies]
    error = replies[0].json()["error"]
    assert "counting stopped there" in error["message"]
    assert "context limit is 32768 tokens" in error["message"]
    assert taken > 0  # the stream took tokens while the counts ran
    fits = {"model": "m", "messages": HELLO}
    assert post(ring, "/v1/messages/count_tokens", fits).json()["input_tokens"] > 5


def test_formats_too_costly_to_enforce_are_refused_before_they_reach_the_batch(
    ring: Ring,
) -> None:
    many = {f"p{i}": {"type": "integer"} for i in range(8000)}
    for schema, why in (
        ({"type": "object", "properties": many}, "8000 optional properties; at most 450"),
        ({"type": "string", "pattern": "^(={128}){3000}\\*$"}, "repeats to 384001 characters"),
    ):
        format_ = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        body = {"messages": HELLO, "max_tokens": 8, "n": 16, "response_format": format_}
        reply = post(ring, "/v1/chat/completions", body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "invalid_format"
        assert why in reply.json()["error"]["message"]
        output_config = {"format": {"type": "json_schema", "schema": schema}}
        body = {"model": "m", "max_tokens": 8, "messages": HELLO, "output_config": output_config}
        reply = post(ring, "/v1/messages", body)
        assert reply.status_code == 400 and why in reply.json()["error"]["message"], reply.text


def info(ring: Ring) -> dict[str, Any]:
    with httpx.Client(base_url=ring.url, timeout=30) as http:
        reply = http.get("/model/info", headers={"Authorization": f"Bearer {KEYS[0]}"})
    body: dict[str, Any] = reply.json()
    return body


def test_a_free_place_goes_to_the_key_with_the_fewest_in_the_batch_not_the_first_in_line(
    ring: Ring, models_dir: Path
) -> None:
    """Key one fills the batch and queues one more request; key two's request, queued after
    it, gets the first place that frees up."""
    held = [LongStream(ring, models_dir, KEYS[0]) for _ in range(BATCH)]
    finished: dict[str, float] = {}

    def short(key: str) -> None:
        body = {"messages": HELLO, "max_tokens": 2}
        assert post(ring, "/v1/chat/completions", body, key).status_code == 200
        finished[key] = time.monotonic()

    try:
        assert within(60, lambda: info(ring)["running"] == BATCH), "the batch never filled"
        first_in_line = threading.Thread(target=short, args=(KEYS[0],), daemon=True)
        first_in_line.start()
        assert within(60, lambda: info(ring)["queued"] == 1), "key one's request never queued"
        other_key = threading.Thread(target=short, args=(KEYS[1],), daemon=True)
        other_key.start()
        assert within(60, lambda: info(ring)["queued"] == 2), "key two's request never queued"

        held[0].leave()  # one place frees up, then the first short answer's place
        assert within(60, lambda: len(finished) == 2), "the short requests were not served"
    finally:
        for stream in held:
            stream.leave()
    assert finished[KEYS[1]] < finished[KEYS[0]]  # first in line was key one's
