"""Rank 0 tells a silent rank from a slow model: what `/health/ready` and requests see when a
rank hangs (SIGSTOP) and comes back (SIGCONT), and when each model step simply takes long."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringserve.model.demo import ensure_demo_model
from tests.ring import Ring, no_eos, running_ring, within

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Tell me about the ring of machines."}]


def readiness(ring: Ring) -> tuple[int, dict[str, Any]]:
    with ring.http() as http:
        reply = http.get("/health/ready")
    return reply.status_code, reply.json()


@contextmanager
def hung(pid: int) -> Iterator[None]:
    """The process stopped, as a host that freezes: alive, connections open, silent."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def rank_pid(ring: Ring, rank: int) -> int:
    return next(p.pid for p in ring.state.ranks if p.rank == rank)


def endless(models_dir: Path, size: str = "tiny", max_tokens: int = 4000) -> dict[str, Any]:
    """A greedy streamed request that cannot end early: EOS is forbidden."""
    return {
        "model": "m",
        "messages": HELLO,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "logit_bias": no_eos(models_dir / f"ringserve-{size}"),
    }


def stream_events(ring: Ring, body: dict[str, Any], seen: list[dict[str, Any]]) -> None:
    with (
        httpx.Client(base_url=ring.url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[len("data: ") :]))


def answer_served(ring: Ring) -> bool:
    body = {"model": "m", "messages": HELLO, "max_tokens": 4, "temperature": 0}
    with ring.http() as http:
        return http.post("/v1/chat/completions", json=body).status_code == 200


def test_a_rank_that_hangs_while_idle_is_reported_then_welcomed_back(
    tmp_path: Path, models_dir: Path
) -> None:
    with running_ring(tmp_path / "run", models_dir, heartbeat_timeout="1") as ring:
        with hung(rank_pid(ring, 1)):
            assert within(10, lambda: readiness(ring)[0] == 503)
            assert "a rank has not answered" in readiness(ring)[1]["reason"]
            body = {"model": "m", "messages": HELLO, "max_tokens": 4}
            with ring.http() as http:
                refused = http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "ranks_unavailable"
        assert within(10, lambda: readiness(ring)[0] == 200)
        assert answer_served(ring)


def test_a_rank_that_hangs_mid_answer_fails_that_answer_and_the_next_is_served(
    tmp_path: Path, models_dir: Path
) -> None:
    with running_ring(
        tmp_path / "run", models_dir, heartbeat_timeout="1", step_timeout="1"
    ) as ring:
        seen: list[dict[str, Any]] = []
        client = threading.Thread(target=stream_events, args=(ring, endless(models_dir), seen))
        client.start()
        assert within(30, lambda: len(seen) > 5), "the answer never started"
        with hung(rank_pid(ring, 1)):
            client.join(15)
            assert not client.is_alive(), "the stream was not ended while a rank hung"
        assert "error" in seen[-1] and "has not" in seen[-1]["error"]["message"]
        assert within(15, lambda: answer_served(ring))


def test_a_rank_that_hangs_during_a_prefill_is_reported(tmp_path: Path, models_dir: Path) -> None:
    # A prefill runs inside the model's own collectives, seconds long on the demo model here;
    # the step timeout bounds how long rank 0 waits in it for a rank that does not answer.
    ensure_demo_model(models_dir, "demo")
    with running_ring(
        tmp_path / "run", models_dir, demo_size="demo", heartbeat_timeout="1", step_timeout="2"
    ) as ring:
        # ~950 tokens: several seconds of prefill here. (Should a machine prefill it in under a
        # second, the hang lands in decoding instead, which must be reported all the same.)
        body = {
            **endless(models_dir, "demo"),
            "messages": [{"role": "user", "content": "=" * 120_000}],
        }
        seen: list[dict[str, Any]] = []
        client = threading.Thread(target=stream_events, args=(ring, body, seen))
        client.start()
        time.sleep(1.0)  # the ranks are now prefilling the long prompt
        with hung(rank_pid(ring, 1)):
            client.join(20)
            assert not client.is_alive(), "the stream was not ended while a rank hung"
        assert "has not" in seen[-1]["error"]["message"]
        assert within(60, lambda: answer_served(ring))


def test_a_slow_model_step_is_not_taken_for_a_silent_rank(tmp_path: Path, models_dir: Path) -> None:
    # Each step of the demo model takes tens of milliseconds here with MLX's bundled BLAS,
    # longer than the heartbeat allows a rank to be silent; only the step timeout may bound it.
    # (With MKL a step may be quicker than the heartbeat, which would test nothing.) A load
    # balancer polling /health/ready all through a long answer must never see the ring as down.
    ensure_demo_model(models_dir, "demo")
    with running_ring(
        tmp_path / "run",
        models_dir,
        demo_size="demo",
        heartbeat_timeout="0.02",
        cpu_blas="bundled",
    ) as ring:
        seen: list[dict[str, Any]] = []
        body = endless(models_dir, "demo", max_tokens=64)
        client = threading.Thread(target=stream_events, args=(ring, body, seen))
        client.start()
        statuses = []
        while client.is_alive():
            statuses.append(readiness(ring))
            time.sleep(0.02)
        client.join()
        assert "error" not in seen[-1], seen[-1]
        assert seen[-1]["choices"][0]["finish_reason"] == "length"
        assert len(statuses) > 20
        assert [s for s in statuses if s[0] != 200] == []
