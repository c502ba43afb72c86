"""A ring that heals itself: real faults (kill -9, SIGSTOP, a killed API, a storm of clients
that leave) on one 2-rank ring, and nobody acting but the keeper `launch.py start` left."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringserve.cluster.local import pid_alive
from ringserve.model.demo import ensure_demo_model
from tests.ring import Ring, no_eos, running_ring, within

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Tell me about the ring of machines."}]
# The answers the load streams: 2 fill the batch, the rest wait in the queue.
BATCH = 2
# A rank reports a silent rank after this long (the default is 5 s), and waits this long more
# before it gives the ring up (the default is 30 s).
HEARTBEAT_S = 3
FROZEN_S = 4
# The time the keeper has to bring the ring back (the goal is 20 s; see bench/RESULTS.md).
SERVING_AGAIN_S = 60


def own_copy(model: Path, where: Path) -> Path:
    """The model with a config.json of its own (a test changes it), its other files linked."""
    where.mkdir()
    for item in model.iterdir():
        if item.name == "config.json":
            shutil.copy(item, where / item.name)
        else:
            (where / item.name).symlink_to(item)
    return where


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    root = tmp_path_factory.mktemp("kept")
    model = own_copy(ensure_demo_model(models_dir, "tiny"), root / "model")
    settings = {
        "model": str(model),
        "parallel": "tensor",
        "batch_size": str(BATCH),
        "heartbeat_timeout": str(HEARTBEAT_S),
        "step_timeout_min": str(HEARTBEAT_S),
        "frozen_timeout": str(FROZEN_S),
    }
    with running_ring(root / "run", models_dir, 2, **settings) as ring:
        yield ring


@dataclass
class Stream:
    """A streamed answer read in a thread: its events, as the client saw them."""

    events: list[dict[str, Any]] = field(default_factory=list)
    began: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def error(self) -> dict[str, Any] | None:
        return self.events[-1].get("error") if self.events else None


def endless(ring: Ring) -> dict[str, Any]:
    """A greedy streamed chat that cannot end early: EOS is forbidden."""
    return {
        "model": "m",
        "messages": HELLO,
        "max_tokens": 4000,
        "stream": True,
        "temperature": 0,
        "logit_bias": no_eos(Path(ring.env["RINGSERVE_MODEL"])),
    }


def start_stream(ring: Ring, body: dict[str, Any]) -> Stream:
    stream = Stream()

    def read() -> None:
        with (
            httpx.Client(base_url=ring.url, timeout=120) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as reply,
        ):
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: ") :])
                    stream.events.append(event)
                    if (event.get("choices") or [{}])[0].get("delta", {}).get("content"):
                        stream.began.set()

    stream.thread = threading.Thread(target=read)
    stream.thread.start()
    return stream


@dataclass
class Asked:
    reply: httpx.Response | None = None
    thread: threading.Thread | None = None


def ask_in_background(ring: Ring, max_tokens: int = 4) -> Asked:
    asked = Asked()
    body = {"model": "m", "messages": HELLO, "max_tokens": max_tokens, "temperature": 0}

    def ask() -> None:
        with ring.http() as http:
            asked.reply = http.post("/v1/chat/completions", json=body)

    asked.thread = threading.Thread(target=ask)
    asked.thread.start()
    return asked


def answer_served(ring: Ring) -> bool:
    body = {"model": "m", "messages": HELLO, "max_tokens": 4, "temperature": 0}
    with ring.http() as http:
        return http.post("/v1/chat/completions", json=body, timeout=60).status_code == 200


def info(ring: Ring) -> dict[str, Any]:
    with ring.http() as http:
        reply = http.get("/model/info")
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def readiness(ring: Ring) -> httpx.Response:
    with ring.http() as http:
        return http.get("/health/ready")


def restarts_metric(ring: Ring) -> float:
    with ring.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "ringserve_ring_restarts":
            return next(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no ringserve_ring_restarts in /metrics")


def rank_pid(ring: Ring, rank: int) -> int:
    return next(p.pid for p in ring.state.ranks if p.rank == rank)


def assert_restarted(ring: Ring, count: int, reason: str) -> None:
    """The restarts as every view shows them: readiness, model info, metrics and status. The
    ring may serve a moment before the keeper's next look at it says the restart is over."""
    assert within(10, lambda: not info(ring)["restarts"]["restarting"]), "still restarting"
    shown = info(ring)["restarts"]
    assert shown["count"] == count and shown["restarting"] is False, shown
    assert reason in shown["last_reason"], shown
    assert readiness(ring).json()["restarts"]["count"] == count
    assert restarts_metric(ring) == count
    status = " ".join(ring.launch("status").stdout.split())
    assert f"keeper: {count} restart(s)" in status and "keeper │" in status


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_under_load_is_replaced_with_nobody_acting(
    ring: Ring, models_dir: Path, victim: int
) -> None:
    before = info(ring)["restarts"]["count"]
    survivor = rank_pid(ring, 1 - victim)
    streams = [start_stream(ring, endless(ring)) for _ in range(BATCH)]
    assert all(s.began.wait(60) for s in streams), "the load never began"
    waiting = [ask_in_background(ring) for _ in range(2)]
    assert within(30, lambda: info(ring)["queued"] == 2), "the requests never queued"

    killed = rank_pid(ring, victim)
    os.kill(killed, signal.SIGKILL)
    for stream in streams:
        assert stream.thread is not None
        stream.thread.join(30)
        assert not stream.thread.is_alive(), "a stream hung"
        error = stream.error
        assert error is not None and error["code"] == "ring_lost", stream.events[-1]
        assert "lost a rank" in error["message"] and "send the request again" in error["message"]
        assert "[ring]" not in error["message"]
    # The requests that waited in the queue are held through the restart, then answered.
    for asked in waiting:
        assert asked.thread is not None
        asked.thread.join(SERVING_AGAIN_S)
        assert asked.reply is not None, "no answer"
        assert asked.reply.status_code == 200, asked.reply.text
        assert asked.reply.json()["usage"]["completion_tokens"] == 4
    assert answer_served(ring)
    assert not pid_alive(killed) and not pid_alive(survivor)
    assert_restarted(ring, before + 1, f"rank {victim} (pid {killed} on this machine) died")


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped, as a host that freezes: alive, connections open, silent."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # the keeper may have replaced it
            os.kill(pid, signal.SIGCONT)


def test_a_frozen_rank_is_a_503_within_seconds_and_serves_when_it_thaws(
    ring: Ring, models_dir: Path
) -> None:
    before = info(ring)["restarts"]["count"]
    stream = start_stream(ring, endless(ring))
    assert stream.began.wait(60)
    pid = rank_pid(ring, 1)
    with frozen(pid):
        started = time.monotonic()
        assert within(10, lambda: readiness(ring).status_code == 503), "never reported"
        assert time.monotonic() - started < 10
        down = readiness(ring)
        assert "has not" in down.json()["reason"] and down.headers["retry-after"]
        with ring.http() as http:
            refused = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert stream.thread is not None
        stream.thread.join(10)
        assert not stream.thread.is_alive() and stream.error is not None
        assert "has not" in stream.error["message"]
    # Thawed before the frozen limit: the same ring serves again, no restart.
    assert within(15, lambda: readiness(ring).status_code == 200)
    assert answer_served(ring)
    assert rank_pid(ring, 1) == pid
    assert info(ring)["restarts"]["count"] == before


def test_a_rank_frozen_past_the_limit_is_replaced_as_if_it_had_died(ring: Ring) -> None:
    before = info(ring)["restarts"]["count"]
    rank0, rank1 = rank_pid(ring, 0), rank_pid(ring, 1)
    with frozen(rank1):
        assert within(SERVING_AGAIN_S, lambda: info_count(ring) == before + 1)
        assert within(SERVING_AGAIN_S, lambda: answer_served(ring))
        assert not pid_alive(rank1), "the frozen rank was left behind"
    assert rank_pid(ring, 1) != rank1
    assert_restarted(ring, before + 1, f"rank 0 (pid {rank0} on this machine) left the ring")


def info_count(ring: Ring) -> int:
    with ring.http() as http:
        reply = http.get("/model/info", timeout=10)
    return int(reply.json()["restarts"]["count"]) if reply.status_code == 200 else -1


def test_a_killed_api_is_started_again(ring: Ring) -> None:
    before = info(ring)["restarts"]["count"]
    api = ring.state.of_role("api")[0]
    ranks = [p.pid for p in ring.state.ranks]
    os.kill(api.pid, signal.SIGKILL)

    def answers() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return readiness(ring).status_code == 200
        return False

    assert within(30, answers)
    assert ring.state.of_role("api")[0].pid != api.pid
    assert [p.pid for p in ring.state.ranks] == ranks  # the ranks went on as they were
    assert_restarted(ring, before + 1, f"the API (pid {api.pid}) died")


async def storm(url: str, clients: int, timeout: float, body: dict[str, Any]) -> list[Any]:
    """`clients` requests at once, each given up after `timeout` seconds (as an SDK does)."""
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        sent = [http.post("/v1/chat/completions", json=body) for _ in range(clients)]
        return await asyncio.gather(*sent, return_exceptions=True)


def chats_by_status(ring: Ring) -> dict[str, float]:
    """The chat requests the API answered, by status (counted whether or not the client was
    still there to read the answer)."""
    with ring.http() as http:
        text = http.get("/metrics").text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "ringserve_requests":
            for sample in family.samples:
                chat = sample.labels.get("endpoint") == "/v1/chat/completions"
                if chat and sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    counts[status] = counts.get(status, 0) + sample.value
    return counts


def test_a_storm_of_clients_that_leave_gets_no_500_and_the_next_request_is_served(
    ring: Ring, models_dir: Path
) -> None:
    before = chats_by_status(ring)
    # Long answers: were the requests of clients that left kept, they would hold the queue.
    body = {
        "messages": HELLO,
        "max_tokens": 512,
        "logit_bias": no_eos(models_dir / "ringserve-tiny"),
    }
    replies = asyncio.run(storm(ring.url, 200, 0.5, body))
    answered = [r for r in replies if isinstance(r, httpx.Response)]
    assert all(r.status_code in (200, 429, 503) for r in answered), [r.text for r in answered]
    assert all("retry-after" in r.headers for r in answered if r.status_code != 200)
    # Every request whose client left is dropped from the queue and the batch.
    assert within(5, lambda: info(ring)["queued"] == info(ring)["running"] == 0), info(ring)
    with ring.http() as http:
        served = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert served.status_code == 200, served.text
    after = chats_by_status(ring)
    grown = {status: after[status] - before.get(status, 0) for status in after}
    assert not [s for s, n in grown.items() if s.startswith("5") and s != "503" and n], grown
    if grown.get("429", 0) + grown.get("503", 0) == 0:
        # Clients whose requests the API never read before they left cannot strain the ring.
        pytest.skip(f"the storm never reached the limits ({grown}): this machine is too busy")
    api_log = (ring.run_dir / "logs" / "api.log").read_text()
    assert "Traceback" not in api_log


def test_a_ring_that_cannot_be_started_again_is_given_up_in_one_line(ring: Ring) -> None:
    config_path = Path(ring.env["RINGSERVE_MODEL"]) / "config.json"
    config = config_path.read_text()
    # The model changed under the ring: a new start meets an error no restart fixes.
    config_path.write_text(json.dumps({**json.loads(config), "num_attention_heads": 7}))
    try:
        keeper = ring.state.of_role("keeper")[0].pid
        os.kill(rank_pid(ring, 1), signal.SIGKILL)
        assert within(SERVING_AGAIN_S, lambda: not pid_alive(keeper)), "the keeper went on"
    finally:
        config_path.write_text(config)
    down = readiness(ring)
    assert down.status_code == 503 and "keeper cannot go on" in down.json()["reason"]
    assert "retry-after" not in down.headers
    with ring.http() as http:
        refused = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert refused.status_code == 503 and "retry-after" not in refused.headers
    error = refused.json()["error"]
    assert error["code"] == "ring_stopped" and "\n" not in error["message"]
    assert error["message"].startswith("the ring cannot serve: the ring cannot be restarted")
    assert "cannot be split by heads over 2 ranks" in error["message"]
    status = ring.launch("status", check=False)
    assert status.returncode != 0 and "the keeper gave up" in " ".join(status.stderr.split())


def ringserve_processes(run_dir: Path) -> list[int]:
    """Every process started for this run (each carries its run directory)."""
    marker = f"RINGSERVE_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def test_stop_leaves_nothing_behind(ring: Ring) -> None:
    assert ringserve_processes(ring.run_dir)
    ring.launch("stop")
    assert not ringserve_processes(ring.run_dir)
    assert not (ring.run_dir / "keeper.json").exists()
