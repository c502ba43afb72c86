"""MLX's CPU build with MKL against its bundled reference BLAS: matmul, prefill, decode, one run.

    .venv/bin/python bench/cpu_blas.py [--size demo] [--prefill 1024 4096] [--tokens 64]
                                       [--streams 8] [--matmul 1024]

Prints a Markdown table for bench/RESULTS.md. "bundled" is the code as it was before MKL
(RINGSERVE_CPU_BLAS=bundled), "MKL" the default. mlx_lm.server is measured as installed and
with the same MKL preloaded, so that the comparison is fair. Starts and stops every server
itself (by PID). `--quick` checks that the script runs (tiny model, small sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from bench.serving import PROMPT, Rows, best_decode, mlx_lm_server, ringserve  # noqa: E402
from ringserve.model.demo import ensure_demo_model  # noqa: E402
from ringserve.platform.blas import mkl_library  # noqa: E402

CHOICES = {"bundled": "bundled", "MKL": "auto"}

# A process readied the way a rank readies itself (pinned first when asked, then the BLAS, then
# MLX) times MLX's float32 matmul in GFLOP/s; numpy's is timed in a process of its own, where no
# MKL thread still spinning after MLX's last call competes with numpy's OpenBLAS threads.
MATMUL = """
import json, os, sys, time
library, choice, n, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
from ringserve.platform.blas import blas_threads, cpus_allowed, current_cpu_blas, load_cpu_blas

def gflops(step):
    step(); step()
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < 2:
        step(); runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - started) / 1e9

if library == "numpy":
    import numpy as np
    x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    print(json.dumps({"gflops": gflops(lambda: x @ x)}))
else:
    load_cpu_blas(choice, blas_threads(cpus_allowed(), 1))
    import mlx.core as mx
    a = mx.random.normal((n, n), stream=mx.cpu)
    rate = gflops(lambda: mx.eval(mx.matmul(a, a, stream=mx.cpu)))
    print(json.dumps({"gflops": rate, "blas": current_cpu_blas().model_dump()}))
"""


def matmul(library: str, choice: str, n: int, cpus: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", MATMUL, library, choice, str(n), str(cpus)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def long_prompt(tokens: int) -> str:
    """About `tokens` tokens of words, opened by a fresh nonce so that no cache holds it."""
    words = "the ring keeps every layer split across machines while each rank computes its share"
    return secrets.token_hex(8) + " " + (words + " ") * (tokens // len(words.split()) + 1)


def prefill(url: str, tokens: int, model: str = "default") -> tuple[int, float]:
    """(prompt tokens, prompt tokens/s) of a cold prompt: one token generated, so the wall
    time is the prefill."""
    body = {"model": model, "prompt": long_prompt(tokens), "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    reply = httpx.post(url + "/v1/completions", json=body, timeout=1800)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    prompt_tokens = int(reply.json()["usage"]["prompt_tokens"])
    return prompt_tokens, prompt_tokens / elapsed


def aggregate_decode(url: str, streams: int, tokens: int, model: str = "default") -> float:
    """Tokens/s of `streams` concurrent greedy answers, all of them together."""
    counts = [0] * streams

    def one(index: int) -> None:
        body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
        reply.raise_for_status()
        counts[index] = int(reply.json()["usage"]["completion_tokens"])

    workers = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--prefill", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--matmul", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.size, args.prefill, args.tokens, args.streams, args.matmul = "tiny", [64], 8, 2, 128
    mkl = mkl_library()
    if mkl is None:
        sys.exit("MKL is not installed for this Python: run scripts/setup.sh")
    model = ensure_demo_model(Path(tempfile.gettempdir()) / "ringserve-bench-models", args.size)
    cpus = len(os.sched_getaffinity(0))
    rows = Rows(f"| measure ({args.size} model, {args.tokens} tokens, greedy) | value |")

    for label, cpu_count in ((f"all {cpus} CPUs", 0), ("pinned to 1 CPU", 1)):
        numpy = matmul("numpy", "", args.matmul, cpu_count)["gflops"]
        for name, choice in CHOICES.items():
            found = matmul("mlx", choice, args.matmul, cpu_count)
            blas = found["blas"]
            rows.append(
                (
                    f"{args.matmul}² float32 matmul, {label}, MLX with {name} "
                    f"({blas['name']}, {blas['threads']} thread(s)) / numpy: GFLOP/s (ratio; "
                    "goal ≥ 0.8 with MKL)",
                    f"{found['gflops']:.1f} / {numpy:.1f} ({found['gflops'] / numpy:.2f})",
                )
            )

    decode: dict[tuple[str, int], float] = {}
    for name, choice in CHOICES.items():
        with ringserve(model, 1, cpu_blas=choice) as served:
            decode[name, 1] = best_decode(served.url, args.tokens)
        with ringserve(model, 2, cpu_blas=choice) as served:
            decode[name, 2] = best_decode(served.url, args.tokens)
            for size in args.prefill:
                prompt_tokens, rate = prefill(served.url, size)
                rows.append(
                    (
                        f"ringserve 2 ranks, {name}: cold prefill of {prompt_tokens} tokens, tok/s",
                        f"{rate:.0f}",
                    )
                )
            together = aggregate_decode(served.url, args.streams, args.tokens)
            rows.append(
                (
                    f"ringserve 2 ranks, {name}: {args.streams} concurrent streams, "
                    "aggregate tok/s",
                    f"{together:.1f}",
                )
            )
    for ranks in (1, 2):
        rows.append(
            (
                f"ringserve {ranks} rank(s), decode tok/s: bundled → MKL (×)",
                f"{decode['bundled', ranks]:.1f} → {decode['MKL', ranks]:.1f} "
                f"(×{decode['MKL', ranks] / decode['bundled', ranks]:.2f})",
            )
        )

    # mlx_lm.server as installed, then with the same MKL preloaded (as a user could do it).
    preloaded = {"LD_PRELOAD": str(mkl), "MKL_NUM_THREADS": str(cpus)}
    for name, env in (("as installed", None), ("with MKL preloaded", preloaded)):
        with mlx_lm_server(model, 1, env) as (url, _):
            single = best_decode(url, args.tokens, str(model))
            prompt_tokens, rate = prefill(url, args.prefill[0], str(model))
            together = aggregate_decode(url, args.streams, args.tokens, str(model))
        rows.append(
            (
                f"mlx_lm.server 1 process, {name}: decode tok/s, {args.streams}-stream "
                f"aggregate tok/s, cold prefill of {prompt_tokens} tokens tok/s",
                f"{single:.1f}, {together:.1f}, {rate:.0f}",
            )
        )


if __name__ == "__main__":
    main()
