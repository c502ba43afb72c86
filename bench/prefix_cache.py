"""Multi-turn chat TTFT with and without prefix reuse: ringserve against mlx_lm.server.

Each server is started here and stopped by its PID. For every conversation size, the first
request is cold (a fresh nonce in the system prompt) and each follow-up adds the previous answer
and a short question, so a server that reuses its KV cache prefills only the new turn.

    python bench/prefix_cache.py --model DIR [--sizes 1024 4096 8192] [--servers ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
from mlx_lm.utils import load_tokenizer

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from tests.ring import free_port  # noqa: E402

TEXT = (
    "the ring keeps every layer split across machines while the cache holds what each rank "
    "already computed so a long chat only pays for its newest turn"
)
WORDS = TEXT.split()
FOLLOW_UPS = 3


@dataclass(frozen=True)
class Turn:
    ttft_s: float
    cached_tokens: int
    prompt_tokens: int
    text: str


@dataclass(frozen=True)
class Result:
    server: str
    size: int
    cold: Turn
    follow_ups: list[Turn]

    @property
    def follow_up_ttft(self) -> float:
        return statistics.median(t.ttft_s for t in self.follow_ups)


def filler(index: int, words: int) -> str:
    return " ".join(WORDS[(index + i) % len(WORDS)] for i in range(words))


def conversation(tokenizer: object, size: int) -> list[dict[str, str]]:
    """A system prompt with a nonce, then user/assistant turns until about `size` tokens."""
    messages = [{"role": "system", "content": f"Session {secrets.token_hex(8)}. Answer briefly."}]
    while count_tokens(tokenizer, messages) < size - 120:
        role = "user" if len(messages) % 2 else "assistant"
        messages.append({"role": role, "content": filler(len(messages), 60)})
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": "Sum it up."})
    return messages


def count_tokens(tokenizer: object, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    return len(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]


def stream_turn(url: str, model: str, messages: list[dict[str, str]], conversation_id: str) -> Turn:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"X-Conversation-Id": conversation_id}
    start = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    usage: dict = {}
    with (
        httpx.Client(timeout=600) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as reply,
    ):
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    ttft = ttft or time.perf_counter() - start
                    text.append(content)
    details = usage.get("prompt_tokens_details") or {}
    return Turn(
        ttft_s=ttft if ttft is not None else time.perf_counter() - start,
        cached_tokens=int(details.get("cached_tokens") or 0),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        text="".join(text),
    )


def run_conversation(server: str, url: str, model: str, tokenizer: object, size: int) -> Result:
    messages = conversation(tokenizer, size)
    conversation_id = secrets.token_hex(6)
    cold = stream_turn(url, model, messages, conversation_id)
    follow_ups = []
    answer = cold.text
    for i in range(FOLLOW_UPS):
        messages = [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Question {i}: and then what?"},
        ]
        turn = stream_turn(url, model, messages, conversation_id)
        follow_ups.append(turn)
        answer = turn.text
    return Result(server, size, cold, follow_ups)


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready in {timeout:.0f} s")


@contextlib.contextmanager
def ringserve(model: Path, ranks: int, budget: int) -> Iterator[str]:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ringserve-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    env.update(
        RINGSERVE_MODEL=str(model),
        RINGSERVE_RUN_DIR=str(run_dir),
        RINGSERVE_LOCAL_RANKS=str(ranks),
        RINGSERVE_API_PORT=str(port),
        RINGSERVE_RING_PORT=str(free_port(ranks)),
        RINGSERVE_PREFIX_CACHE_TOKENS=str(budget),
    )
    launch = [sys.executable, str(PROJECT_DIR / "launch.py")]
    subprocess.run([*launch, "start"], cwd=PROJECT_DIR, env=env, check=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*launch, "stop"], cwd=PROJECT_DIR, env=env, check=False)


@contextlib.contextmanager
def mlx_lm_server(model: Path, ranks: int) -> Iterator[str]:
    port = free_port()
    serve = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port)]
    if ranks == 1:
        command = serve
    else:
        launcher = str(Path(sys.executable).with_name("mlx.launch"))
        ring_port = str(free_port(ranks))
        command = [launcher, "-n", str(ranks), "--backend", "ring", "-p", ring_port, "--", *serve]
    with tempfile.NamedTemporaryFile(prefix="bench-mlx-lm-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        # The server (and, under mlx.launch, its ranks) lead their own session: stop that group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        print(f"  (log: {log.name})", file=sys.stderr)


def server_factories(
    model: Path, budget: int
) -> dict[str, Callable[[], AbstractContextManager[str]]]:
    return {
        "ringserve-2": lambda: ringserve(model, 2, budget),
        "ringserve-1": lambda: ringserve(model, 1, budget),
        "mlx_lm-1": lambda: mlx_lm_server(model, 1),
        "mlx_lm-2": lambda: mlx_lm_server(model, 2),
    }


def table(results: list[Result]) -> str:
    lines = [
        "| server | prompt tokens | cold TTFT (s) | follow-up TTFT (s, median of 3) | "
        "follow-up ÷ cold | cached tokens (follow-ups) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        cached = ", ".join(str(t.cached_tokens) for t in r.follow_ups)
        lines.append(
            f"| {r.server} | {r.cold.prompt_tokens or r.size} | {r.cold.ttft_s:.3f} | "
            f"{r.follow_up_ttft:.4f} | 1/{r.cold.ttft_s / r.follow_up_ttft:.0f} | {cached} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--servers", nargs="+", default=["ringserve-2", "mlx_lm-1", "mlx_lm-2"])
    parser.add_argument("--budget", type=int, default=32768, help="ringserve's token budget")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    results: list[Result] = []
    factories = server_factories(args.model, args.budget)
    for name in args.servers:
        print(f"{name}:", file=sys.stderr)
        try:
            with factories[name]() as url:
                for size in args.sizes:
                    result = run_conversation(name, url, str(args.model), tokenizer, size)
                    print(
                        f"  {size}: cold {result.cold.ttft_s:.3f} s, follow-up "
                        f"{result.follow_up_ttft:.4f} s",
                        file=sys.stderr,
                    )
                    results.append(result)
        except (RuntimeError, httpx.HTTPError, subprocess.CalledProcessError) as exc:
            print(f"  {name} failed: {exc}", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
