"""Time from a fault to serving again, with nobody acting but the keeper `start` leaves.

    .venv/bin/python bench/healing.py [--size demo] [--repeats 3] [--streams 4]

For each fault, a fresh 2-rank ring (default settings) with `--streams` answers streaming:
kill -9 of rank 1, kill -9 of rank 0, kill -9 of the API, and rank 1 frozen (SIGSTOP, kept
stopped). Right after the fault a client asks for a short answer (held by the API through the
restart); the time until that answer arrives is "serving again". For the frozen rank, also the
time until `/health/ready` says 503. Then a second kill -9 of rank 1 right after the first
restart shows the back-off. Prints a Markdown table for bench/RESULTS.md. Starts and stops
every ring itself (launch.py, by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringserve.cluster.state import ProcessRecord, load_state
from ringserve.model.demo import ensure_demo_model
from tests.ring import Ring, no_eos, ring_env, started_ring

HELLO = [{"role": "user", "content": "Describe how the ring of machines shares one model."}]
GIVE_UP_S = 180.0


def load(ring: Ring, streams: int, forbid: dict[str, float]) -> list[threading.Thread]:
    """Answers streaming until the fault ends them."""
    body = {"messages": HELLO, "max_tokens": 4000, "stream": True, "logit_bias": forbid}
    began = threading.Barrier(streams + 1)

    def stream() -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.Client(base_url=ring.url, timeout=GIVE_UP_S) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as reply,
        ):
            waiting = True
            for line in reply.iter_lines():
                if waiting and has_text(line):
                    began.wait()
                    waiting = False

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    began.wait(timeout=120)
    return threads


def has_text(line: str) -> bool:
    """Whether an SSE line carries generated text (not the role chunk sent on acceptance)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def until_served(url: str, since: float) -> float:
    """Seconds from `since` until a short answer asked for now (and again on a refusal)
    arrives."""
    body = {"messages": HELLO, "max_tokens": 4}
    with httpx.Client(base_url=url, timeout=GIVE_UP_S) as http:
        while time.monotonic() - since < GIVE_UP_S:
            with contextlib.suppress(httpx.HTTPError):
                if http.post("/v1/chat/completions", json=body).status_code == 200:
                    return time.monotonic() - since
            time.sleep(0.1)
    raise RuntimeError("the ring never served again")


def until_unready(url: str, since: float) -> float:
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() - since < GIVE_UP_S:
            with contextlib.suppress(httpx.HTTPError):
                if http.get("/health/ready").status_code == 503:
                    return time.monotonic() - since
            time.sleep(0.1)
    raise RuntimeError("never reported")


def record(ring: Ring, role: str, rank: int | None = None) -> ProcessRecord:
    state = load_state(ring.run_dir)
    assert state is not None
    return next(p for p in state.processes if p.role == role and p.rank == rank)


Fault = Callable[[Ring], Callable[[], None]]  # does the fault; returns what undoes it


def kill(role: str, rank: int | None = None) -> Fault:
    def fault(ring: Ring) -> Callable[[], None]:
        os.kill(record(ring, role, rank).pid, signal.SIGKILL)
        return lambda: None

    return fault


def freeze(rank: int) -> Fault:
    def fault(ring: Ring) -> Callable[[], None]:
        pid = record(ring, "rank", rank).pid
        os.kill(pid, signal.SIGSTOP)
        return lambda: _thaw(pid)

    return fault


def _thaw(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def fresh_ring(models: Path, size: str) -> Iterator[Ring]:
    with tempfile.TemporaryDirectory(prefix="ringserve-heal-") as tmp:
        env = ring_env(Path(tmp) / "run", models, 2, demo_size=size, start_timeout="300")
        with started_ring(env, Path(tmp) / "run") as ring:
            yield ring


def measure(
    models: Path,
    size: str,
    fault: Fault,
    streams: int,
    forbid: dict[str, float],
    twice: bool,
    readiness: bool,
) -> dict[str, float]:
    found: dict[str, float] = {}
    with fresh_ring(models, size) as ring:
        load(ring, streams, forbid)
        at = time.monotonic()
        undo = fault(ring)
        watch = threading.Thread(target=lambda: found.update(unready=until_unready(ring.url, at)))
        if readiness:
            watch.start()
        try:
            found["served"] = until_served(ring.url, at)
            if readiness:
                watch.join(GIVE_UP_S)
            if twice:  # the same fault again, at once: the back-off
                again = time.monotonic()
                fault(ring)
                found["again"] = until_served(ring.url, again)
        finally:
            undo()
    return found


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=("tiny", "tiny-deep", "demo"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--models", type=Path, default=Path(".ringserve/models"))
    args = parser.parse_args()
    model = ensure_demo_model(args.models, args.size)
    forbid = no_eos(model)
    faults: list[tuple[str, Fault, bool, bool]] = [  # name, fault, twice, readiness
        ("kill -9 rank 1", kill("rank", 1), True, True),
        ("kill -9 rank 0", kill("rank", 0), False, True),
        ("kill -9 the API", kill("api"), False, False),
        ("SIGSTOP rank 1 (kept stopped)", freeze(1), False, True),
    ]
    print(
        f"| {args.size} model, 2 ranks, {args.streams} streams | 503 after (s) "
        "| serving again after (s) | a second kill at once (s) |"
    )
    print("|---|---|---|---|")
    for name, fault, twice, readiness in faults:
        runs = [
            measure(args.models, args.size, fault, args.streams, forbid, twice, readiness)
            for _ in range(args.repeats)
        ]
        unready = summary([r["unready"] for r in runs]) if readiness else "-"
        again = summary([r["again"] for r in runs]) if twice else "-"
        print(f"| {name} | {unready} | {summary([r['served'] for r in runs])} | {again} |")


if __name__ == "__main__":
    main()
