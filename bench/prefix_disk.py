"""The prefix cache's memory: what quantized KV saves, what a restart costs, what quality it costs.

    .venv/bin/python bench/prefix_disk.py [--size 8192] [--bits 0 8 4] [--budget-gib 1]

1. Context beside the weights: bytes a stored token takes on each rank (read off a real 2-rank
   ring's /gpu/info, RAM), per KV bits, for the demo model in float32 (heads 64 wide, so groups
   of 64), a bfloat16 copy of it, and a bfloat16 llama-family model with heads 128 wide as most
   released models have (groups of 128); how many tokens fit in a fixed memory budget per rank
   once its weights are in. mlx_lm.server
   with --kv-bits keeps the same mlx-lm QuantizedKVCache: its bytes a token are measured in
   process (one process holds every head, so halved to compare with a rank).
2. A follow-up after a restart: a ~8k-token conversation on a 2-rank ring of the demo model,
   cold; a follow-up (warm, RAM); `launch.py restart`; a follow-up (warm, from disk). TTFT of
   each. mlx_lm.server (one process, MKL preloaded) keeps its prompt cache in RAM only: the
   same follow-ups, around a restart of its process.
3. Quality of quantized KV, in process on the demo model (float32 and bfloat16): a prefix of
   ~1k tokens of the demo corpus, then the next few hundred read teacher-forced, with the
   prefix's KV stored quantized (ringserve: the prefix is quantized, new tokens are computed in
   full precision) and with every KV quantized (mlx_lm.server --kv-bits, from the first token),
   against full precision: the share of positions whose greedy token agrees, and the mean
   absolute difference of the logprob of full precision's greedy token. For float32 also where
   free-running greedy decoding after the prefix first diverges from full precision's.

The demo model has random weights: its quality numbers measure the arithmetic, not a language.
Prints Markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from ringserve.platform.blas import load_cpu_blas, mkl_library  # noqa: E402

load_cpu_blas("auto", os.cpu_count() or 1)  # before MLX: compute with MKL, as the ranks do

import httpx  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.generate import maybe_quantize_kv_cache  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load_tokenizer, save_config, save_model  # noqa: E402

from bench.prefix_cache import Turn, conversation, stream_turn  # noqa: E402
from bench.serving import mlx_lm_server  # noqa: E402
from ringserve.engine.kv_format import KvFormat, stored_form, working_copy  # noqa: E402
from ringserve.model.demo import CORPUS_PATH, ensure_demo_model  # noqa: E402
from tests.families import build_family_model  # noqa: E402
from tests.ring import launch, ring_env  # noqa: E402

GROUP = 64  # the demo model's heads are 64 wide
WIDE_SCALE = 8  # the family models' widths times 8: heads 128 wide
GIB = 1024**3


@contextlib.contextmanager
def ring(model: Path, root: Path, **settings: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A 2-rank ring of `model`; yields its URL and the environment `launch.py` needs."""
    run_dir = root / f"run-{secrets.token_hex(3)}"
    env = ring_env(run_dir, root / "models", 2, model=str(model), **settings)
    launch(env, "start")
    try:
        yield json.loads((run_dir / "state.json").read_text())["api_url"], env
    finally:
        launch(env, "stop", check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def per_rank(url: str) -> list[dict[str, Any]]:
    """Each rank's bytes a stored token takes in RAM, and its weight bytes."""
    with httpx.Client(base_url=url, timeout=120) as http:
        ranks = http.get("/gpu/info").json()["ranks"]
        split = {s["rank"]: s["weight_bytes"] for s in http.get("/model/info").json()["split"]}
    return [
        {
            "rank": r["rank"],
            "per_token": r["prefix_cache_bytes"]["ram_bytes"] / r["prefix_cache"]["tokens"],
            "weights": split.get(r["rank"], 0),
        }
        for r in ranks
    ]


def follow_up(messages: list[dict[str, str]], answer: str, i: int) -> list[dict[str, str]]:
    question = {"role": "user", "content": f"Question {i}: and then what?"}
    return [*messages, {"role": "assistant", "content": answer}, question]


@dataclass
class RestartRun:
    server: str
    cold: Turn
    warm: Turn
    restarted: Turn


def ringserve_restart(model: Path, root: Path, size: int, bits: int) -> tuple[RestartRun, Any]:
    tokenizer = load_tokenizer(model)
    with ring(model, root, prefix_cache_tokens="32768", kv_bits=str(bits)) as (url, env):
        messages = conversation(tokenizer, size)
        cid = secrets.token_hex(6)
        cold = stream_turn(url, str(model), messages, cid)
        messages = follow_up(messages, cold.text, 1)
        warm = stream_turn(url, str(model), messages, cid)
        launch(env, "restart")
        url = json.loads((Path(env["RINGSERVE_RUN_DIR"]) / "state.json").read_text())["api_url"]
        restarted = stream_turn(url, str(model), follow_up(messages, warm.text, 2), cid)
        return RestartRun(f"ringserve 2 ranks, KV bits {bits}", cold, warm, restarted), per_rank(
            url
        )


@contextlib.contextmanager
def mlx_lm_process(model: Path) -> Iterator[str]:
    """mlx_lm.server, one process with MKL preloaded (as ringserve's ranks compute with it)."""
    mkl = mkl_library()
    env = {"LD_PRELOAD": str(mkl)} if mkl else {}
    with mlx_lm_server(model, 1, env, args=("--prompt-cache-size", "4")) as (url, _):
        yield url


def mlx_lm_restart(model: Path, size: int) -> RestartRun:
    tokenizer = load_tokenizer(model)
    messages = conversation(tokenizer, size)
    cid = secrets.token_hex(6)
    with mlx_lm_process(model) as url:
        cold = stream_turn(url, str(model), messages, cid)
        messages = follow_up(messages, cold.text, 1)
        warm = stream_turn(url, str(model), messages, cid)
    with mlx_lm_process(model) as url:
        restarted = stream_turn(url, str(model), follow_up(messages, warm.text, 2), cid)
    return RestartRun("mlx_lm.server 1 process", cold, warm, restarted)


def bfloat16_copy(model: Path, out: Path) -> Path:
    loaded = load(str(model))[0]
    config = json.loads((model / "config.json").read_text())
    loaded.set_dtype(mx.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, loaded)
    save_config({**config, "torch_dtype": "bfloat16"}, out / "config.json")
    for file in model.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, out / file.name)
    return out


def mlx_lm_bytes_per_token(model_path: Path, bits: int, group: int, tokens: int = 512) -> float:
    """What mlx_lm.server --kv-bits keeps a token, in one process (every head)."""
    model = load(str(model_path))[0]
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, tokens + 1))]), cache=cache))
    if bits:
        maybe_quantize_kv_cache(cache, 0, group, bits)
    held = sum(c.nbytes for c in cache)
    return held / tokens


MemoryRow = tuple[str, int, int, list[dict[str, Any]], float]


def memory_table(rows: list[MemoryRow], budget: int) -> str:
    lines = [
        f"| model | KV bits (group) | bytes a token, each rank (RAM) | weights a rank | tokens in "
        f"{budget / GIB:.0f} GiB a rank beside them | × KV bits 0 | mlx_lm.server --kv-bits, "
        "bytes a token ÷ 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    for name, bits, group, ranks, mlx_lm_bytes in rows:
        per_token = max(r["per_token"] for r in ranks)
        weights = max(r["weights"] for r in ranks)
        fits = (budget - weights) / per_token
        base.setdefault(name, fits)
        each = " / ".join(f"{r['per_token']:.0f}" for r in ranks)
        lines.append(
            f"| {name} | {bits} ({group}) | {each} | "
            f"{weights / 1024**2:.1f} MiB | {fits:,.0f} | {fits / base[name]:.2f} | "
            f"{mlx_lm_bytes / 2:.0f} |"
        )
    return "\n".join(lines)


def restart_table(runs: list[RestartRun]) -> str:
    lines = [
        "| server | prompt tokens | cold TTFT (s) | follow-up TTFT (s) | after a restart: TTFT (s) "
        "| after ÷ cold | cached tokens (follow-up, after) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.server} | {run.cold.prompt_tokens} | {run.cold.ttft_s:.2f} | "
            f"{run.warm.ttft_s:.3f} | {run.restarted.ttft_s:.3f} | "
            f"1/{run.cold.ttft_s / run.restarted.ttft_s:.0f} | "
            f"{run.warm.cached_tokens}, {run.restarted.cached_tokens} |"
        )
    return "\n".join(lines)


# --- quality ----------------------------------------------------------------------------------


def teacher_forced(model: Any, cache: list[Any], tokens: list[int]) -> np.ndarray:
    """Log-probabilities the model gives after each of `tokens`, fed at once after `cache`."""
    logits = model(mx.array([tokens]), cache=cache)[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(logprobs)


def greedy(model: Any, cache: list[Any], first: int, count: int) -> list[int]:
    taken, token = [], first
    for _ in range(count):
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        token = int(mx.argmax(logits))
        taken.append(token)
    return taken


def prefix_cache_of(model: Any, prefix: list[int]) -> list[Any]:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prefix]), cache=cache), [c.state for c in cache])
    return cache


def quality(model_path: Path, bits_list: list[int], prefix_len: int, count: int) -> list[str]:
    model = load(str(model_path))[0]
    tokenizer = load_tokenizer(model_path)
    text = tokenizer.encode(CORPUS_PATH.read_text())
    prefix, forced = text[: prefix_len - 1], text[prefix_len - 1 : prefix_len - 1 + count]
    reference = teacher_forced(model, prefix_cache_of(model, prefix), forced)
    best = reference.argmax(-1)
    at = np.arange(len(best))
    free_running = mx.float32 in {p.dtype for _, p in tree_flatten(model.parameters())}  # type: ignore[union-attr,str-unpack]
    reference_answer = greedy(model, prefix_cache_of(model, prefix), forced[0], count)
    rows = []
    for bits in bits_list:
        stored = stored_form(prefix_cache_of(model, prefix), KvFormat(bits, GROUP))

        def ours(stored: list[Any] = stored) -> list[Any]:
            return working_copy(stored)

        def theirs(bits: int = bits) -> list[Any]:
            cache = prefix_cache_of(model, prefix)
            maybe_quantize_kv_cache(cache, 0, GROUP, bits)
            return cache

        for way, fresh in (
            ("ringserve (stored prefix quantized)", ours),
            ("mlx_lm.server --kv-bits (all KV quantized)", theirs),
        ):
            logprobs = teacher_forced(model, fresh(), forced)
            agree = float(np.mean(logprobs.argmax(-1) == best))
            diff = float(np.abs(logprobs[at, best] - reference[at, best]).mean())
            where = "—"
            if free_running:
                free = greedy(model, fresh(), forced[0], count)
                pairs = zip(free, reference_answer, strict=True)
                diverged = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
                where = f"token {diverged + 1}" if diverged is not None else f"none in {count}"
            rows.append(
                f"| {model_path.name} | {bits} | {way} | {agree:.4f} | {diff:.5f} | {where} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="conversation tokens for part 2")
    parser.add_argument("--bits", type=int, nargs="+", default=[0, 8, 4])
    parser.add_argument("--budget-gib", type=float, default=1.0, help="memory a rank, part 1")
    parser.add_argument("--prefix", type=int, default=1024, help="prefix tokens, part 3")
    parser.add_argument("--tokens", type=int, default=300, help="tokens compared, part 3")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prefix-disk-") as tmp:
        root = Path(tmp)
        demo = ensure_demo_model(root / "models", "demo")
        half = bfloat16_copy(demo, root / "models" / "ringserve-demo-bf16")

        print("\n### 3. Quality\n")
        print(
            "| model | KV bits | how | greedy agreement (teacher-forced) | mean abs. logprob "
            "difference | free-running greedy: first divergence |"
        )
        print("|---|---|---|---|---|---|")
        for model_path in (demo, half):
            for row in quality(model_path, [b for b in args.bits if b], args.prefix, args.tokens):
                print(row, flush=True)

        runs: list[RestartRun] = []
        memory_rows: list[MemoryRow] = []
        for bits in args.bits:
            run, ranks = ringserve_restart(demo, root, args.size, bits)
            runs.append(run)
            memory_rows.append(
                (demo.name, bits, GROUP, ranks, mlx_lm_bytes_per_token(demo, bits, GROUP))
            )
            print(f"  {run.server}: {run}", file=sys.stderr, flush=True)
        wide = build_family_model("llama", root / "models" / "llama-x8", demo, scale=WIDE_SCALE)
        wide = bfloat16_copy(wide, root / "models" / "llama-x8-bf16")
        for model_path, group in ((half, GROUP), (wide, 128)):
            for bits in args.bits:
                settings = {"kv_bits": str(bits), "kv_group_size": str(group)}
                with ring(model_path, root, prefix_cache_tokens="32768", **settings) as (url, _):
                    tokenizer = load_tokenizer(model_path)
                    stream_turn(url, str(model_path), conversation(tokenizer, 1024), "memory")
                    ranks = per_rank(url)
                mlx_lm_bytes = mlx_lm_bytes_per_token(model_path, bits, group)
                memory_rows.append((model_path.name, bits, group, ranks, mlx_lm_bytes))
        if not args.skip_mlx_lm:
            runs.append(mlx_lm_restart(demo, args.size))

        print("\n### 1. Context beside the weights\n")
        print(memory_table(memory_rows, int(args.budget_gib * GIB)))
        print("\n### 2. A follow-up after a restart\n")
        print(restart_table(runs))


if __name__ == "__main__":
    main()
