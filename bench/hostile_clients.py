"""One client's hostile requests against another's stream: how each is answered, and how long
the other key's stream waited for a token meanwhile (the longest gap while the hostile request
ran, against the stream's median gap).

    .venv/bin/python bench/hostile_clients.py [--size tiny]

A 2-rank ring with two API keys; key B streams a long answer (greedy, end token forbidden)
while key A sends each body, or holds connections, one case after another. Prints a Markdown
table for bench/RESULTS.md. Starts and stops the ring itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from ringserve.api.connections import raise_descriptor_limit  # noqa: E402
from tests.ring import Ring, no_eos, running_ring  # noqa: E402

KEY_A, KEY_B = "key-a", "key-b"


def many(item: bytes, count: int) -> bytes:
    return b",".join([item] * count)


def nested(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


HELLO = b'[{"role":"user","content":"a"}]'
BODIES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "400k one-character messages (12 MB)": (
        "/v1/chat/completions",
        lambda: (
            b'{"max_tokens":2,"messages":['
            + many(b'{"role":"user","content":"a"}', 400_000)
            + b"]}"
        ),
    ),
    "3M token ids (6 MB)": (
        "/v1/completions",
        lambda: b'{"max_tokens":2,"prompt":[' + many(b"7", 3_000_000) + b"]}",
    ),
    "a 24 MB unknown field": (
        "/v1/chat/completions",
        lambda: b'{"max_tokens":2,"messages":' + HELLO + b',"x":[' + many(b"0", 12_000_000) + b"]}",
    ),
    "1M tool_result blocks (55 MB)": (
        "/v1/messages",
        lambda: (
            b'{"max_tokens":2,"messages":[{"role":"user","content":['
            + many(b'{"type":"tool_result","tool_use_id":"t","content":"x"}', 1_000_000)
            + b"]}]}"
        ),
    ),
    "40k tool_result blocks (2 MB)": (
        "/v1/messages",
        lambda: (
            b'{"max_tokens":2,"messages":[{"role":"user","content":['
            + many(b'{"type":"tool_result","tool_use_id":"t","content":"x"}', 40_000)
            + b"]}]}"
        ),
    ),
    "a schema 130 objects deep": (
        "/v1/chat/completions",
        lambda: json.dumps(
            {
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "a"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": nested(130)},
                },
            }
        ).encode(),
    ),
    "16 MB of Responses metadata": (
        "/v1/responses",
        lambda: json.dumps(
            {"input": "a", "max_output_tokens": 1, "metadata": {"k": "v" * 16_000_000}}
        ).encode(),
    ),
    "just under the bounds: 140k empty arrays, 300k numbers (2 MB), served": (
        "/v1/chat/completions",
        lambda: (
            b'{"max_tokens":2,"messages":'
            + HELLO
            + b',"x":['
            + many(b"[]", 140_000)
            + b'],"y":['
            + many(b"0", 300_000)
            + b"]}"
        ),
    ),
    "30k one-character messages (rank 0 renders them)": (
        "/v1/chat/completions",
        lambda: (
            b'{"max_tokens":2,"messages":[' + many(b'{"role":"user","content":"a"}', 30_000) + b"]}"
        ),
    ),
}


class Stream:
    """Key B's stream, in a thread: the time each content chunk arrived."""

    def __init__(self, ring: Ring, bias: dict[str, float]) -> None:
        self.ring, self.bias = ring, bias
        self.arrivals: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 8000,
            "stream": True,
            "temperature": 0,
            "logit_bias": self.bias,
        }
        headers = {"Authorization": f"Bearer {KEY_B}"}
        with (
            httpx.Client(base_url=self.ring.url, timeout=600, headers=headers) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as reply,
        ):
            for line in reply.iter_lines():
                if line.startswith("data:"):
                    self.arrivals.append(time.monotonic())
                if self.stop.is_set():
                    return

    def gaps(self, start: float, end: float) -> list[float]:
        stamps = [t for t in self.arrivals if start <= t <= end]
        return [b - a for a, b in itertools.pairwise(stamps)]


@contextlib.contextmanager
def streaming(ring: Ring, bias: dict[str, float]) -> Iterator[Stream]:
    stream = Stream(ring, bias)
    stream.thread.start()
    try:
        time.sleep(2)
        yield stream
    finally:
        stream.stop.set()
        stream.thread.join(60)


def measure(stream: Stream, act: Callable[[], str]) -> tuple[str, float, float, float]:
    """What `act` answered, how long it took, the stream's longest gap meanwhile, and its
    mean gap in the 2 s before (chunks can arrive in bursts: the mean, not the median)."""
    start = time.monotonic()
    answer = act()
    end = time.monotonic()
    time.sleep(0.5)  # the token that was due when it ended
    during = stream.gaps(start, end + 0.5)
    usual = stream.gaps(start - 2, start)
    return answer, end - start, max(during, default=0.0), statistics.fmean(usual or [0.0])


def post(ring: Ring, path: str, raw: bytes) -> str:
    headers = {"Authorization": f"Bearer {KEY_A}", "content-type": "application/json"}
    with httpx.Client(base_url=ring.url, timeout=600, headers=headers) as http:
        reply = http.post(path, content=raw)
    if reply.status_code < 400:
        return str(reply.status_code)
    return f"{reply.status_code}: {reply.json()['error']['message'][:70]}"


def ready_body(ring: Ring, path: str, make: Callable[[], bytes]) -> Callable[[], str]:
    return functools.partial(post, ring, path, make())


def idle_connections(ring: Ring, count: int) -> str:
    """`count` connections that send nothing; then a new client's request, timed."""
    url = urlsplit(ring.url)
    held = []
    try:
        for _ in range(count):
            held.append(socket.create_connection((url.hostname, url.port), timeout=10))
        started = time.monotonic()
        with httpx.Client(base_url=ring.url, timeout=30) as http:
            status = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY_A}"})
        return f"new client {status.status_code} in {time.monotonic() - started:.2f} s"
    finally:
        for sock in held:
            sock.close()


def slowloris(ring: Ring, count: int, seconds: float) -> str:
    """`count` connections sending their headers a byte at a time; how many the API closed."""
    url = urlsplit(ring.url)
    held = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(count)]
    closed = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and closed < count:
            closed = 0
            for sock in held:
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed += 1
            time.sleep(1)
        return f"{closed} of {count} closed within {seconds:.0f} s"
    finally:
        for sock in held:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "demo"])
    args = parser.parse_args()
    raise_descriptor_limit()  # this process holds thousands of connections too
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        with running_ring(
            root / "run", root / "models", api_key=f"{KEY_A},{KEY_B}", demo_size=args.size
        ) as ring:
            bias = no_eos(root / "models" / f"ringserve-{args.size}")
            rows = []
            # Each case made ready (a body built) before it is timed.
            cases: dict[str, Callable[[], Callable[[], str]]] = {
                name: functools.partial(ready_body, ring, path, make)
                for name, (path, make) in BODIES.items()
            }
            cases["2,100 idle connections"] = lambda: lambda: idle_connections(ring, 2100)
            cases["300 slowloris connections"] = lambda: lambda: slowloris(ring, 300, 40)
            for name, prepare in cases.items():
                act = prepare()
                with streaming(ring, bias) as stream:
                    answer, took, longest, usual = measure(stream, act)
                rows.append((name, answer, took, longest, usual))
                print(f"{name}: {answer} in {took:.2f} s; gap {longest:.3f} s", file=sys.stderr)
    print("| request (key A) | answer | took s | key B's longest gap s | its mean gap before s |")
    print("|---|---|---|---|---|")
    for name, answer, took, longest, usual in rows:
        print(f"| {name} | {answer} | {took:.2f} | {longest:.3f} | {usual:.3f} |")


if __name__ == "__main__":
    main()
