"""Decode speed, idle CPU and idle-backoff latency: ringserve against raw mlx-lm, one run.

    .venv/bin/python bench/serving.py [--size demo] [--tokens 64] [--idle-seconds 30]

Prints a Markdown table for bench/RESULTS.md. Starts and stops every server itself (by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringserve.model.demo import ensure_demo_model
from tests.ring import launch, ring_env

PROMPT = [{"role": "user", "content": "Describe how the ring of machines shares one model."}]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pid and int(entry.name) != pid:  # same process group
                    found.append(int(entry.name))
    return found


def in_process_decode(model_path: Path, tokens: int) -> float:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_path))[:2]
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    for _ in range(2):  # the first run warms up
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=tokens))
    return float(responses[-1].generation_tps)


def content_arrivals(
    url: str, body: dict[str, Any], timeout: float = 600
) -> tuple[float, list[float]]:
    """When a streamed chat answer was asked for, and when each piece of its content came."""
    stamps: list[float] = []
    started = time.perf_counter()
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r,
    ):
        said = []
        for line in r.iter_lines():
            said.append(line)
            if line.startswith("data: {") and '"content"' in line:
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        answer = " ".join(line for line in said if line)[:300]
        raise ServerFailed(f"HTTP {r.status_code}, no content: {answer}")
    return started, stamps


def stream_timing(url: str, tokens: int, model: str = "default") -> tuple[float, float]:
    """(time to first token, decode tokens/s between the first and the last token)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0}
    started, stamps = content_arrivals(url, body)
    ttft = stamps[0] - started
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, rate


def best_decode(url: str, tokens: int, model: str = "default", runs: int = 3) -> float:
    stream_timing(url, 4, model)
    return max(stream_timing(url, tokens, model)[1] for _ in range(runs))


def first_token_ms(url: str, runs: int = 5) -> float:
    """Median time to the first streamed token of the short prompt, on a warm server."""
    return 1000 * statistics.median(stream_timing(url, 2)[0] for _ in range(runs))


@dataclass
class Served:
    url: str
    pids: list[int]
    run_dir: Path


@contextlib.contextmanager
def ringserve(model: Path, ranks: int, **settings: str) -> Iterator[Served]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = ring_env(run_dir, Path(tmp) / "models", ranks, model=str(model), **settings)
        launch(env, "start")
        state = json.loads((run_dir / "state.json").read_text())
        try:
            yield Served(state["api_url"], [p["pid"] for p in state["processes"]], run_dir)
        finally:
            launch(env, "stop", check=False)


class ServerFailed(RuntimeError):
    """The reference server exited before it served (its last line of output)."""


def last_error(output: str) -> str:
    """The last exception line of a process's output (its last line when none), uncoloured."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return (errors or lines or ["no output"])[-1]


@contextlib.contextmanager
def mlx_lm_server(
    model: Path, ranks: int, env: Mapping[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[tuple[str, list[int]]]:
    """mlx_lm.server (under mlx.launch for several ranks), with `env` added to its environment
    and `args` to its command line; the same port every time in one process."""
    port = 18000 + os.getpid() % 1000
    server = [str(Path(sys.executable).with_name("mlx_lm.server")), "--model", str(model)]
    server += ["--port", str(port), *args]
    if ranks > 1:
        launcher = str(Path(sys.executable).with_name("mlx.launch"))
        argv = [launcher, "-n", str(ranks), "--backend", "ring", "--", *server]
    else:
        argv = server
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                if process.poll() is not None:
                    log.seek(0)
                    raise ServerFailed(last_error(log.read().decode(errors="replace")))
                time.sleep(0.5)
            yield url, descendants(process.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def idle_cpu_percent(pids: list[int], seconds: float) -> float:
    return sum(idle_cpu_by_process(pids, seconds))


def idle_cpu_by_process(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU over `seconds` of idling, in % of one core (after 2 s to settle)."""
    time.sleep(2)
    before = [cpu_seconds([pid]) for pid in pids]
    time.sleep(seconds)
    return [100 * (cpu_seconds([pid]) - b) / seconds for pid, b in zip(pids, before, strict=True)]


def waits_after_idle(url: str, run_dir: Path, samples: int = 20) -> list[float]:
    """How long (ms) requests sent after 2 s of idling waited for the ranks' next op, as rank 0
    logs it ("queued X ms"): the latency the idle backoff adds.

    Each pause is 2 s plus a random part of 0.2 s, so that requests land at any point of the
    ranks' sleep: with a fixed pause they land at nearly the same point every time."""
    jitter = random.Random(0)
    for _ in range(samples):
        time.sleep(2.0 + jitter.uniform(0, 0.2))
        stream_timing(url, 1)
    log = (run_dir / "logs" / "rank0.log").read_text()
    return [float(m) for m in re.findall(r"queued ([0-9.]+) ms", log)][-samples:]


class Rows:
    """Prints each table row as soon as it is measured."""

    def __init__(self, heading: str) -> None:
        print(heading + "\n|---|---|", flush=True)

    def append(self, row: tuple[str, str]) -> None:
        print(f"| {row[0]} | {row[1]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--idle-seconds", type=float, default=30)
    args = parser.parse_args()
    models = Path(tempfile.gettempdir()) / "ringserve-bench-models"
    model = ensure_demo_model(models, args.size)
    rows = Rows(f"| measure ({args.size} model, {args.tokens} tokens, greedy) | value |")

    raw = in_process_decode(model, args.tokens)
    rows.append(("in-process mlx-lm stream_generate, decode tok/s", f"{raw:.1f}"))

    with ringserve(model, 1) as served:
        one = best_decode(served.url, args.tokens)
        one_ttft = first_token_ms(served.url)
    rows.append(("ringserve 1 rank through the API, decode tok/s", f"{one:.1f}"))
    rows.append(("ringserve 1 rank, time to first token, ms (median of 5)", f"{one_ttft:.0f}"))
    rows.append(("ringserve 1 rank ÷ in-process (goal ≥ 0.97)", f"{one / raw:.3f}"))

    with ringserve(model, 2) as served:
        two = best_decode(served.url, args.tokens)
        two_ttft = first_token_ms(served.url)
        by_process = idle_cpu_by_process(served.pids, args.idle_seconds)
        waits = waits_after_idle(served.url, served.run_dir)
    rows.append(("ringserve 2 ranks through the API, decode tok/s", f"{two:.1f}"))
    rows.append(("ringserve 2 ranks, time to first token, ms (median of 5)", f"{two_ttft:.0f}"))
    rows.append(
        (
            f"ringserve 2 ranks + API, idle CPU over {args.idle_seconds:.0f} s "
            "(% of one core, goal ≤ 2)",
            f"{sum(by_process):.2f}",
        )
    )
    rows.append(
        ("  of which rank 0 / rank 1 / API", " / ".join(f"{share:.2f}" for share in by_process))
    )
    with ringserve(model, 2, pin_cpus="false") as served:
        unpinned_two = best_decode(served.url, args.tokens)
        unpinned_idle = idle_cpu_percent(served.pids, args.idle_seconds)
    rows.append(
        (
            "the same with RINGSERVE_PIN_CPUS=false: decode tok/s, idle CPU (% of one core)",
            f"{unpinned_two:.1f}, {unpinned_idle:.2f}",
        )
    )

    rows.append(
        (
            "wait for the next op after 2-2.2 s idle, ms (median / max of 20; goal ≤ 50)",
            f"{statistics.median(waits):.1f} / {max(waits):.1f}",
        )
    )
    for sleep_ms in ("100", "200"):
        with ringserve(model, 2, idle_max_sleep_ms=sleep_ms) as served:
            idle_longer = idle_cpu_percent(served.pids, args.idle_seconds)
        rows.append(
            (
                f"idle CPU with RINGSERVE_IDLE_MAX_SLEEP_MS={sleep_ms} (% of one core)",
                f"{idle_longer:.2f}",
            )
        )

    with mlx_lm_server(model, 1) as (url, _):
        server_one = best_decode(url, args.tokens, str(model))
    rows.append(("mlx_lm.server 1 rank, decode tok/s", f"{server_one:.1f}"))
    with mlx_lm_server(model, 2) as (url, pids):
        server_two = best_decode(url, args.tokens, str(model))
        server_idle = idle_cpu_percent(pids, min(args.idle_seconds, 10))
    rows.append(("mlx_lm.server under mlx.launch -n 2, decode tok/s", f"{server_two:.1f}"))
    rows.append(
        ("mlx_lm.server under mlx.launch -n 2, idle CPU (% of one core)", f"{server_idle:.1f}")
    )
    rows.append(("ringserve 2 ranks ÷ mlx_lm.server 2 ranks, decode", f"{two / server_two:.3f}"))


if __name__ == "__main__":
    main()
