"""Many clients at once on a 2-rank ring: requests are generated together in one batch, each
as it would be alone, and they join, leave and fail without stopping the others."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringserve.cluster.local import pid_alive
from ringserve.model.demo import ensure_demo_model
from tests.ring import Ring, no_eos, running_ring

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "Tell me about the ring of machines.",
    "Why?",
    "What does the cache hold?",
    "Say something long.",
    "Ünïcödé and 日本語 in one line.",
    "Count to ten.",
    "Who keeps the model?",
    "One more question.",
]


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    with running_ring(tmp_path_factory.mktemp("batch"), models_dir, batch_size="8") as ring:
        yield ring


@pytest.fixture(scope="module")
def forbid_eos(models_dir: Path) -> dict[str, float]:
    return no_eos(ensure_demo_model(models_dir, "tiny"))


@dataclass
class Stream:
    """A streamed chat answer as it arrived: its text, and when each piece came."""

    text: str = ""
    arrivals: list[float] = field(default_factory=list)
    finish: str | None = None
    error: dict[str, Any] | None = None
    first_chunk: threading.Event = field(default_factory=threading.Event)


def stream_chat(
    ring: Ring, body: dict[str, Any], into: Stream, stop: threading.Event | None = None
) -> None:
    with (
        httpx.Client(base_url=ring.url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply,
    ):
        for line in reply.iter_lines():
            if stop is not None and stop.is_set():
                return  # closing the stream cancels the request
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                into.error = event["error"]
                return
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    into.text += choice["delta"]["content"]
                    into.arrivals.append(time.monotonic())
                    into.first_chunk.set()
                into.finish = choice["finish_reason"] or into.finish


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": question}], **extra}


def alone(ring: Ring, body: dict[str, Any]) -> str:
    answer = Stream()
    stream_chat(ring, body, answer)
    assert answer.finish == "length", answer
    return answer.text


def test_eight_streams_at_once_each_equal_to_its_answer_alone(
    ring: Ring, forbid_eos: dict[str, float]
) -> None:
    bodies = [
        chat(q, max_tokens=64, logit_bias=forbid_eos)
        | ({"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "seed": 100 + i})
        for i, q in enumerate(QUESTIONS)
    ]
    expected = [alone(ring, body) for body in bodies]
    answers = [Stream() for _ in bodies]
    running: list[int] = []
    with ThreadPoolExecutor(len(bodies)) as pool:
        done = pool.map(lambda pair: stream_chat(ring, *pair), zip(bodies, answers, strict=True))
        deadline = time.monotonic() + 120
        with ring.http() as http:
            while not all(a.finish or a.error for a in answers) and time.monotonic() < deadline:
                running.append(http.get("/model/info").json()["running"])
        list(done)
    assert [a.text for a in answers] == expected
    assert max(running) >= 4  # they were generated together
    with ring.http() as http:
        first, second = (r["prefix_cache"] for r in http.get("/gpu/info").json()["ranks"])
    assert first == second  # the same cache decisions on both ranks, digest included


def test_a_request_joins_a_running_batch_and_a_cancelled_one_leaves_it(
    ring: Ring, forbid_eos: dict[str, float]
) -> None:
    long = chat(QUESTIONS[0], max_tokens=600, temperature=0, logit_bias=forbid_eos)
    first, leaving, joining = Stream(), Stream(), Stream()
    leave = threading.Event()
    threads = [
        threading.Thread(target=stream_chat, args=(ring, long, first)),
        threading.Thread(target=stream_chat, args=(ring, long, leaving, leave)),
    ]
    for thread in threads:
        thread.start()
    assert first.first_chunk.wait(60) and leaving.first_chunk.wait(60)
    join = threading.Thread(target=stream_chat, args=(ring, chat("Hi", max_tokens=8), joining))
    join.start()
    join.join(60)
    assert joining.finish in ("stop", "length") and joining.text
    leave.set()  # its client goes: the other streams go on
    for thread in threads:
        thread.join(120)
    assert first.finish == "length" and len(first.arrivals) > 100
    assert leaving.finish is None  # it never finished: it left
    # The first stream went on while the joining one ran, and after the other one left.
    assert any(joining.arrivals[0] <= t <= joining.arrivals[-1] for t in first.arrivals)
    log = (ring.run_dir / "logs" / "rank0.log").read_text()
    assert " cancelled: " in log


def test_a_long_prompt_admitted_mid_batch_does_not_stop_the_streams(
    ring: Ring, forbid_eos: dict[str, float]
) -> None:
    running = Stream()
    body = chat(QUESTIONS[3], max_tokens=1500, temperature=0, logit_bias=forbid_eos)
    thread = threading.Thread(target=stream_chat, args=(ring, body, running))
    thread.start()
    assert running.first_chunk.wait(60)
    # A prompt of thousands of tokens: prefilled in chunks of 256 between decode steps.
    long_prompt = "the ring keeps every layer of the model split across machines. " * 300
    asked = time.monotonic()
    with ring.http() as http:
        reply = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    answered = time.monotonic()
    thread.join(120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] > 2000
    during = [t for t in running.arrivals if asked < t < answered]
    assert len(during) >= 5, "the running stream stalled for the whole prefill"
    gaps = [b - a for a, b in zip([asked, *during], [*during, answered], strict=True)]
    print(
        f"prefill of {reply.json()['usage']['prompt_tokens']} tokens took "
        f"{answered - asked:.2f} s; the running stream's longest gap {max(gaps):.3f} s"
    )


def test_telemetry_answers_while_a_batch_runs(ring: Ring, forbid_eos: dict[str, float]) -> None:
    running = Stream()
    body = chat(QUESTIONS[1], max_tokens=1500, temperature=0, logit_bias=forbid_eos)
    thread = threading.Thread(target=stream_chat, args=(ring, body, running))
    thread.start()
    assert running.first_chunk.wait(60)
    with ring.http() as http:
        started = time.monotonic()
        reply = http.get("/gpu/info", timeout=30)
        waited = time.monotonic() - started
        ready = http.get("/health/ready")
    still_streaming = running.finish is None
    thread.join(120)
    assert reply.status_code == 200 and len(reply.json()["ranks"]) == 2
    assert ready.status_code == 200
    assert still_streaming, f"the stream ended before telemetry answered ({waited:.1f} s)"


def test_a_rank_that_loses_its_peer_ends_every_stream_and_leaves_the_ring(
    tmp_path: Path, models_dir: Path
) -> None:
    # Without a keeper to restart the ring (tests/test_e2e_keeper.py has one), what the ranks
    # do alone: no rank stays behind busy-waiting in a broken ring.
    forbid = no_eos(ensure_demo_model(models_dir, "tiny"))
    with running_ring(tmp_path / "run", models_dir, heartbeat_timeout="2", keeper="false") as short:
        streams = [Stream() for _ in range(3)]
        body = chat(QUESTIONS[0], max_tokens=4000, temperature=0, logit_bias=forbid)
        threads = [threading.Thread(target=stream_chat, args=(short, body, s)) for s in streams]
        for thread in threads:
            thread.start()
        assert all(s.first_chunk.wait(60) for s in streams)
        rank0, rank1 = short.state.ranks
        os.kill(rank1.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads), "a stream hung"
        assert all(s.error is not None and s.finish is None for s in streams), streams
        assert all("lost a rank" in str(s.error) and "[ring]" not in str(s.error) for s in streams)
        deadline = time.monotonic() + 15
        while pid_alive(rank0.pid):
            assert time.monotonic() < deadline, "rank 0 stayed in the broken ring"
            time.sleep(0.2)
        assert f"left the ring (pid {rank0.pid})" in Path(rank0.log_path).read_text()
        with short.http() as http:
            assert http.get("/health/ready").status_code == 503
            again = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert again.status_code == 503 and again.headers["retry-after"]
