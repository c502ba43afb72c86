"""Pipeline against tensor parallelism on 2 ranks: decode and prefill speed (beside
mlx_lm.server, alone and under mlx.launch, in the same run), and each rank's memory for a 1:3
pipeline split.

    .venv/bin/python bench/pipeline.py [--size demo] [--tokens 64] [--prefill 1024]
    .venv/bin/python bench/pipeline.py --family mixtral   # a family's model, 8x the test's widths

Prints a Markdown table for bench/RESULTS.md. Starts and stops every ring itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_blas import prefill
from bench.serving import ServerFailed, best_decode, mlx_lm_server, ringserve
from ringserve.model.demo import ensure_demo_model
from ringserve.telemetry.memory import human_bytes
from tests.families import build_family_model

GB = 1000**3


def speeds(url: str, tokens: int, prefill_tokens: int, model: str = "default") -> dict[str, Any]:
    """Greedy decode tok/s, and cold prefill tok/s of a long prompt (the better of two)."""
    decode = best_decode(url, tokens, model)
    prefill(url, 64, model)  # warm
    prompt_tokens, prefill_rate = max(prefill(url, prefill_tokens, model) for _ in range(2))
    return {"decode": decode, "prefill": prefill_rate, "prompt_tokens": prompt_tokens}


def measure(url: str, tokens: int, prefill_tokens: int) -> dict[str, Any]:
    """A ringserve ring's speeds, its split and each rank's memory after the runs."""
    measured = speeds(url, tokens, prefill_tokens)
    info = httpx.get(url + "/model/info", timeout=60).json()
    ranks = sorted(
        httpx.get(url + "/gpu/info", timeout=60).json()["ranks"], key=lambda r: r["rank"]
    )
    return {
        **measured,
        "split": info["split"],
        "memory": [r["model_memory"] for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=["tiny-deep", "demo"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--family", help="a family of tests/families.py instead of the demo")
    args = parser.parse_args()
    models = Path(".ringserve/models")
    model = ensure_demo_model(models, args.size)
    if args.family:
        model = models / "families-bench" / args.family
        if not model.is_dir():
            build_family_model(args.family, model, ensure_demo_model(models, "tiny"), scale=8)
        args.size = f"{args.family} (8x widths)"
    budgets = [3 * GB, 1 * GB]
    hosts = json.dumps([{"host": "127.0.0.1", "ranks": 2, "memory_budget": budgets}])
    layouts: dict[str, tuple[int, dict[str, str]]] = {
        "1 rank": (1, {}),
        "tensor, 2 ranks": (2, {"parallel": "tensor"}),
        "pipeline 1:3, 2 ranks": (2, {"parallel": "pipeline", "hosts": hosts}),
    }
    results = {}
    for name, (ranks, settings) in layouts.items():
        with ringserve(model, ranks, **settings) as served:
            results[name] = measure(served.url, args.tokens, args.prefill)
        print(f"{name}: {results[name]}", file=sys.stderr)
    references: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for name, ranks in {"mlx_lm.server": 1, "mlx_lm.server under mlx.launch -n 2": 2}.items():
        try:
            with mlx_lm_server(model, ranks) as (url, _):
                # mlx_lm.server serves the model named by its path.
                references[name] = speeds(url, args.tokens, args.prefill, str(model))
        except ServerFailed as exc:
            failures[name] = str(exc)
        print(f"{name}: {references.get(name) or failures[name]}", file=sys.stderr)

    print(
        f"| {args.size} model, {args.tokens} tokens greedy | decode tok/s | prefill tok/s "
        f"({results['1 rank']['prompt_tokens']} tokens) |"
    )
    print("|---|---|---|")
    for name, result in {**results, **references}.items():
        print(f"| {name} | {result['decode']:.1f} | {result['prefill']:.0f} |")
    for name, failure in failures.items():
        print(f"| {name} | fails: `{failure}` | |")
    print()
    print("| rank (layout) | layers | weights | MLX peak while loading | MLX now | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        shares = {s["rank"]: s for s in result["split"]}
        for rank, memory in enumerate(result["memory"]):
            share = shares.get(rank)
            layers = f"{share['layers'][0]}-{share['layers'][1] - 1}" if share else "all"
            weights = human_bytes(share["weight_bytes"]) if share else "all"
            print(
                f"| {rank} ({name}) | {layers} | {weights} | "
                f"{human_bytes(memory['mlx_peak_load'])} | {human_bytes(memory['mlx_active'])} | "
                f"{human_bytes(memory['peak_rss'])} |"
            )


if __name__ == "__main__":
    main()
