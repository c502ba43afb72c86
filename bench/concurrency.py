"""Many clients at once: aggregate decode and time to first token at 1, 4, 8 and 16 concurrent
streams, ringserve against mlx_lm.server (one process, and two ranks under mlx.launch).

    .venv/bin/python bench/concurrency.py [--size demo] [--streams 1 4 8 16] [--tokens 64]

Every stream asks its own short question (a fresh nonce: no prefix is shared) for `--tokens`
tokens, greedy, with the end token forbidden so every answer has exactly that many. Every
server computes with MKL. Prints a Markdown table for bench/RESULTS.md. Starts and stops every
server itself (by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from bench.serving import content_arrivals, mlx_lm_server, ringserve  # noqa: E402
from ringserve.model.demo import ensure_demo_model  # noqa: E402
from ringserve.platform.blas import mkl_library  # noqa: E402
from tests.ring import no_eos  # noqa: E402


def one_stream(
    url: str, model: str, tokens: int, bias: dict[str, float], out: dict[str, float]
) -> None:
    body = {
        "model": model,  # mlx_lm.server loads whatever model a request names
        "messages": [{"role": "user", "content": f"{secrets.token_hex(4)}: tell me about it."}],
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": bias,
    }
    started, stamps = content_arrivals(url, body, timeout=1800)
    out["ttft"] = stamps[0] - started


def concurrent(
    url: str, model: str, streams: int, tokens: int, bias: dict[str, float]
) -> dict[str, float]:
    results: list[dict[str, float]] = [{} for _ in range(streams)]
    workers = [
        threading.Thread(target=one_stream, args=(url, model, tokens, bias, results[i]))
        for i in range(streams)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "aggregate": streams * tokens / wall,
        "ttft_median": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


@contextlib.contextmanager
def ring(model: Path) -> Iterator[str]:
    with ringserve(model, 2) as served:
        yield served.url


@contextlib.contextmanager
def mlx_lm(model: Path, ranks: int) -> Iterator[str]:
    """mlx_lm.server with the BLAS ringserve's ranks use (MKL, preloaded), so that the
    comparison is of the servers, not of their BLAS; its ranks share the CPUs."""
    mkl = mkl_library()
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = {"LD_PRELOAD": str(mkl), "MKL_NUM_THREADS": threads} if mkl else {}
    with mlx_lm_server(model, ranks, env) as (url, _):
        yield url


SERVERS: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
    "ringserve 2 ranks": ring,
    "mlx_lm.server 1 process": lambda model: mlx_lm(model, 1),
    "mlx_lm.server, mlx.launch -n 2": lambda model: mlx_lm(model, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_demo_model(Path(tmp), args.size)
        bias = no_eos(model)
        print("| server | streams | aggregate tok/s | TTFT median / p95 (s) |")
        print("|---|---|---|---|")
        for name, serve in SERVERS.items():
            with serve(model) as url:
                concurrent(url, str(model), 2, 8, bias)  # warm up
                for streams in args.streams:
                    found = concurrent(url, str(model), streams, args.tokens, bias)
                    print(
                        f"| {name} | {streams} | {found['aggregate']:.1f} | "
                        f"{found['ttft_median']:.2f} / {found['ttft_p95']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
