"""What holding an answer to a grammar costs: decode tok/s free and constrained on a 2-rank ring,
and the mask's own cost per token, computed as every rank computes it.

    .venv/bin/python bench/structured.py [--size demo] [--tokens 64]

The constrained answer is a JSON object whose one field is a free string, so the grammar is
active for every token of the answer (a random model writes that string until max_tokens).
Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from bench.serving import ringserve  # noqa: E402
from ringserve.engine.structure import Grammars, grammar, json_answer  # noqa: E402
from ringserve.model.demo import ensure_demo_model  # noqa: E402
from tests.ring import no_eos  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
PROMPT = [{"role": "user", "content": "Tell me a long story about the ring."}]


def decode_rate(url: str, tokens: int, extra: dict[str, Any]) -> float:
    """Tokens/s between the first and the last streamed piece (best of 3), counted in tokens
    (the usage chunk), not pieces: a piece may hold several tokens."""
    best = 0.0
    for _ in range(3):
        body = {"model": "m", "messages": PROMPT, "max_tokens": tokens, "temperature": 0}
        body["stream_options"] = {"include_usage": True}
        stamps: list[float] = []
        generated = 0
        with (
            httpx.Client(timeout=600) as client,
            client.stream(
                "POST", url + "/v1/chat/completions", json={**body, **extra, "stream": True}
            ) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content": "' in line:
                    stamps.append(time.perf_counter())
                if line.startswith("data: {") and '"usage": {' in line:
                    generated = json.loads(line[6:])["usage"]["completion_tokens"]
        if len(stamps) > 1:
            best = max(best, (generated - 1) / (stamps[-1] - stamps[0]))
    return best


def mask_cost_us(model: Path, tokens: int) -> float:
    """Microseconds per token for the grammar processor (consume, mask, apply), in process."""
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(model)
    config = json.loads((model / "config.json").read_text())
    grammars = Grammars(tokenizer)
    processor = grammars.processor(grammar(json_answer(SCHEMA)))
    context = [int(tokenizer.encode("x")[0])]
    rng = np.random.default_rng(0)
    logits = [mx.array(rng.standard_normal((1, config["vocab_size"])).astype(np.float32))]
    mx.eval(logits)
    spent = 0.0
    for _ in range(tokens):
        started = time.perf_counter()
        masked = processor(mx.array(context), logits[0])
        mx.eval(masked)
        spent += time.perf_counter() - started
        context.append(int(np.asarray(mx.argmax(masked, axis=-1))[0]))
    return 1e6 * spent / tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_demo_model(Path(tmp), args.size)
        bias = no_eos(model)
        with ringserve(model, 2) as served:
            free = decode_rate(served.url, args.tokens, {"logit_bias": bias})
            schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
            held = decode_rate(
                served.url, args.tokens, {"response_format": schema, "logit_bias": bias}
            )
        cost = mask_cost_us(model, args.tokens)
    step_us = 1e6 / free
    print(f"| measure ({args.size} model, {args.tokens} tokens, 2 ranks) | value |")
    print("|---|---|")
    print(f"| decode tok/s, free | {free:.1f} |")
    print(f"| decode tok/s, held to a JSON schema | {held:.1f} ({held / free:.2f}×) |")
    print(f"| mask per token, µs (consume, mask, apply; in process) | {cost:.0f} |")
    print(f"| mask ÷ free decode step (goal ≤ 10 %) | {100 * cost / step_us:.1f} % |")


if __name__ == "__main__":
    main()
