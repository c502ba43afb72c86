"""A user's view of a 2-rank ring on this machine: the OpenAI SDK, curl-style HTTP, launch.py."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mlx_lm import load

from ringserve.cluster.local import pid_alive
from ringserve.platform.cpu_share import cpu_cores, cpu_share, describe_cpus
from tests.ring import MKL_EXPECTED, Ring, launch, mapped, no_eos, ring_env, running_ring

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Tell me about the ring of machines."}]


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    with running_ring(tmp_path_factory.mktemp("ring2"), models_dir, ranks=2) as ring:
        yield ring


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    with running_ring(tmp_path_factory.mktemp("ring1"), models_dir, ranks=1) as ring:
        yield ring


@pytest.fixture(scope="module")
def long_answer(models_dir: Path) -> dict[str, Any]:
    """A streamed request that keeps the ring busy for seconds: greedy, with EOS forbidden."""
    return {
        "model": "m",
        "messages": HELLO,
        "max_tokens": 4000,
        "stream": True,
        "temperature": 0,
        "logit_bias": no_eos(models_dir / "ringserve-tiny"),
    }


def greedy(ring: Ring, messages: list[dict[str, str]], max_tokens: int = 48, **extra: Any) -> Any:
    client: Any = ring.client()
    return client.chat.completions.create(
        model="ringserve-tiny", messages=messages, max_tokens=max_tokens, temperature=0, **extra
    )


def test_non_streaming_chat_in_openai_shape(ring: Ring) -> None:
    reply = greedy(ring, HELLO, max_tokens=12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streaming_chat_as_the_sdk_expects(ring: Ring) -> None:
    client: Any = ring.client()
    stream = client.chat.completions.create(
        model="ringserve-tiny",
        messages=HELLO,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == greedy(ring, HELLO, max_tokens=10).choices[0].message.content


@pytest.mark.skipif(not MKL_EXPECTED, reason="setup installs MKL for the CPU build on x86_64")
def test_every_process_computes_with_mkl_on_a_thread_per_cpu_of_its_own(
    ring: Ring, single: Ring
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    for started, ranks in ((ring, 2), (single, 1)):
        for report in started.rank_reports():
            blas = report["cpu_blas"]
            assert blas["name"] == "MKL" and blas["library"] in mapped(report["pid"])
            share = cpu_share(allowed, report["rank"], ranks, cpu_cores(allowed))
            assert blas["threads"] == (len(share) if share else max(1, len(allowed) // ranks))
            log = (started.run_dir / "logs" / f"rank{report['rank']}.log").read_text()
            assert f"CPU BLAS: MKL, {blas['threads']} thread" in log
    # The launcher, which builds the demo model, on every CPU it may use.
    assert f"CPU BLAS: MKL, {len(allowed)} thread" in single.start_log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_bundled_leaves_mlx_its_own_blas(tmp_path: Path, models_dir: Path) -> None:
    with running_ring(tmp_path / "run", models_dir, ranks=1, cpu_blas="bundled") as one:
        (report,) = one.rank_reports()
        bundled = "MLX's bundled reference BLAS"
        assert report["cpu_blas"]["name"] == bundled and report["cpu_blas"]["threads"] == 1
        assert not [f for f in mapped(report["pid"]) if "libmkl" in f or "libopenblas" in f]
        log = (one.run_dir / "logs" / "rank0.log").read_text()
        assert "as RINGSERVE_CPU_BLAS=bundled asks" in log
        status = " ".join(one.launch("status").stdout.split())
        assert f"CPU BLAS {bundled}, 1 thread" in status


# Both rings compute with MKL where setup installs it (the test above).
def test_two_ranks_generate_what_one_process_generates(ring: Ring, single: Ring) -> None:
    conversations = [
        HELLO,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        [{"role": "user", "content": "Ünïcödé, 日本語 and emoji 🚀 in one line."}],
    ]
    for messages in conversations:
        two = greedy(ring, messages, max_tokens=40)
        one = greedy(single, messages, max_tokens=40)
        assert two.choices[0].message.content == one.choices[0].message.content
        assert two.usage.prompt_tokens == one.usage.prompt_tokens
        assert two.usage.completion_tokens == one.usage.completion_tokens
    # Sampled with a seed: each sequence draws from its own key, whatever the rank count.
    clients: list[Any] = [ring.client(), single.client()]
    two, one = (
        c.chat.completions.create(model="m", messages=HELLO, max_tokens=24, temperature=1, seed=7)
        for c in clients
    )
    assert two.choices[0].message.content == one.choices[0].message.content


def test_long_and_multibyte_prompts_arrive_whole(ring: Ring, models_dir: Path) -> None:
    _, tokenizer = load(str(models_dir / "ringserve-tiny"))[:2]
    # Multibyte text between long rules (which the tokenizer packs densely, so the prefill
    # stays short): the bytes cross every 4096-byte boundary, split characters included.
    unit = "Ünïcödé 日本語 🚀 — " + "=" * 7000 + "\n"
    prompt = (unit * (100_000 // len(unit) + 1))[:100_000]
    reply = ring.client().completions.create(
        model="ringserve-tiny", prompt=prompt, max_tokens=4, temperature=0
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == 4


def test_stop_strings_end_the_answer_before_the_stop(ring: Ring) -> None:
    full = greedy(ring, HELLO, max_tokens=40).choices[0].message.content or ""
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"greedy output too uniform to pick a stop string: {full!r}"
    stopped = greedy(ring, HELLO, max_tokens=40, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 17}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "vocabulary"),
        ({"max_tokens": 1_000_000}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs: needs logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f f"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "same name"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_parameters_get_a_400_in_openai_shape(
    ring: Ring, body: dict[str, object], fragment: str
) -> None:
    request = {"model": "ringserve-tiny", "messages": HELLO, **body}
    with ring.http() as http:
        reply = http.post("/v1/chat/completions", json=request)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_chat_logprobs_list_each_token_with_its_alternatives(ring: Ring) -> None:
    answer = greedy(ring, HELLO, max_tokens=8, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        ranked = [alternative.logprob for alternative in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and ranked[0] <= 0
        # Greedy: the chosen token is the most likely one.
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, ranked[0])
        assert entry.bytes == list(entry.token.encode())

    stream = greedy(ring, HELLO, max_tokens=8, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_logprobs_with_a_stop_string_end_where_the_answer_ends(ring: Ring) -> None:
    full = greedy(ring, HELLO, max_tokens=16, logprobs=True)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 :][:3]
    stopped = greedy(ring, HELLO, max_tokens=16, stop=[stop], logprobs=True)
    assert stopped.choices[0].finish_reason == "stop"
    entries = stopped.choices[0].logprobs.content
    # The same tokens as the unstopped answer's, up to the one that completed the stop string.
    assert [(e.token, e.logprob) for e in entries] == [
        (e.token, e.logprob) for e in full.choices[0].logprobs.content[: len(entries)]
    ]
    assert 0 < len(entries) <= stopped.usage.completion_tokens < 16


def sampled(ring: Ring, **extra: Any) -> Any:
    """Six tokens sampled at temperature 1 with EOS forbidden, so every choice has six."""
    bias = no_eos(Path(ring.env["RINGSERVE_MODELS_DIR"]) / "ringserve-tiny")
    client: Any = ring.client()
    return client.chat.completions.create(
        model="ringserve-tiny", messages=HELLO, max_tokens=6, logit_bias=bias, **extra
    )


def test_n_choices_are_separate_seeded_answers(ring: Ring) -> None:
    three = sampled(ring, n=3, seed=5)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) == 3
    single = sampled(ring, seed=6)  # choice 1 is the answer to the same request with seed + 1
    assert texts[1] == single.choices[0].message.content
    assert three.usage.prompt_tokens == single.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * 6
    assert [c.message.content for c in sampled(ring, n=3, seed=5).choices] == texts


def test_n_choices_stream_together(ring: Ring) -> None:
    whole = sampled(ring, n=2, seed=11)
    stream = sampled(ring, n=2, seed=11, stream=True, stream_options={"include_usage": True})
    texts = ["", ""]
    indexes, finishes, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            indexes.append(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append((choice.index, choice.finish_reason))
    assert indexes != sorted(indexes)  # generated together: their chunks interleave
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert texts == [c.message.content for c in whole.choices]
    assert usage is not None and usage.completion_tokens == 2 * 6


def test_logprobs_are_absent_unless_asked_for(ring: Ring) -> None:
    assert greedy(ring, HELLO, max_tokens=2).choices[0].logprobs is None
    only_chosen = greedy(ring, HELLO, max_tokens=2, logprobs=True).choices[0].logprobs
    assert [entry.top_logprobs for entry in only_chosen.content] == [[], []]


def test_echo_puts_the_prompt_before_each_answer(ring: Ring) -> None:
    client: Any = ring.client()
    asked = {"model": "ringserve-tiny", "prompt": "The ring", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(**asked).choices[0].text
    echoed = client.completions.create(**asked, echo=True)
    assert echoed.choices[0].text == "The ring" + plain
    streamed = "".join(
        choice.text
        for chunk in client.completions.create(**asked, echo=True, stream=True)
        for choice in chunk.choices
    )
    assert streamed == "The ring" + plain
    # Scoring the prompt (tests/test_e2e_prompt_logprobs.py) changes neither text.
    assert client.completions.create(**asked, echo=True, logprobs=1).choices[0].text == (
        "The ring" + plain
    )


def test_text_completion_logprobs_in_the_legacy_columns(ring: Ring) -> None:
    client: Any = ring.client()
    answer = client.completions.create(
        model="ringserve-tiny", prompt="The ring", max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    columns = zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True)
    for token, logprob, top in columns:
        # Keyed by text, as OpenAI's are: two tokens that decode alike share one key.
        assert 1 <= len(top) <= 2
        assert top[token] == logprob == max(top.values())
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(6)]


def test_an_answer_is_exactly_the_text_of_its_tokens(ring: Ring) -> None:
    """No leading space dropped from the first token: joined to its prompt, a completion reads
    as the model continued it. (Each token's own text comes with its log probability.)"""
    client: Any = ring.client()
    starts_with_space = 0
    for prompt in ("The ring", "Hello", "the", "Every layer", "and the", "rank"):
        answer = client.completions.create(
            model="m", prompt=prompt, max_tokens=8, temperature=0, logprobs=0
        )
        tokens = answer.choices[0].logprobs.tokens
        if any("\ufffd" in token for token in tokens):
            continue  # a character split across tokens: no token's own text shows it
        assert answer.choices[0].text == "".join(tokens)
        starts_with_space += tokens[0].startswith(" ")
        chat = greedy(ring, [{"role": "user", "content": prompt}], max_tokens=8, logprobs=True)
        entries = chat.choices[0].logprobs.content
        if not any("\ufffd" in entry.token for entry in entries):
            assert chat.choices[0].message.content == "".join(e.token for e in entries)
            starts_with_space += entries[0].token.startswith(" ")
    assert starts_with_space  # the case this guards did occur


def test_a_prompt_over_the_context_limit_names_the_counts(tmp_path: Path, models_dir: Path) -> None:
    with running_ring(tmp_path / "run", models_dir, ranks=2, context_limit="64") as small:
        with pytest.raises(openai.BadRequestError) as caught:
            greedy(small, [{"role": "user", "content": "word " * 200}])
        message = str(caught.value)
        assert "context limit is 64 tokens" in message
        assert "the prompt has" in message
        # The ring is still fine afterwards.
        assert greedy(small, [{"role": "user", "content": "hi"}], max_tokens=4).choices


def test_client_disconnect_cancels_and_the_next_request_is_served(
    ring: Ring, long_answer: dict[str, Any]
) -> None:
    body = long_answer
    with ring.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as stream:
        first_lines = itertools.islice(stream.iter_lines(), 6)
        received = [line for line in first_lines if line.startswith("data:")]
        assert received
    log = ring.run_dir / "logs" / "rank0.log"
    deadline = time.monotonic() + 30
    while "cancelling" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cancelling" in log.read_text()
    reply = greedy(ring, HELLO, max_tokens=6)
    assert reply.usage is not None and reply.usage.completion_tokens == 6


def test_health_model_info_and_models(ring: Ring) -> None:
    with ring.http() as http:
        assert http.get("/health/live").json() == {"live": True}
        ready = http.get("/health/ready")
        info = http.get("/model/info").json()
    assert ready.status_code == 200 and ready.json()["ranks"] == 2
    assert info["ranks"] == 2 and info["backend"] == "ring"
    assert info["dtype"] == "float32" and info["parameters"] > 0
    assert info["context_limit"] == 32768  # the tiny model's max_position_embeddings
    models = ring.client().models.list()
    assert [m.id for m in models.data] == [info["model"]] == ["ringserve-tiny"]


def test_the_socket_is_private_to_the_user(ring: Ring) -> None:
    socket_path = ring.run_dir / "rank0.sock"
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ring.run_dir.stat().st_mode) == 0o700


def thread_cpus(pid: int) -> set[str]:
    """The CPU list each thread of the process may run on, as Linux writes it."""
    found = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(line.split(":", 1)[1].strip())
    return found


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_ranks_sharing_this_host_keep_to_their_own_cpus(ring: Ring) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    for rank in ring.state.ranks:
        assert rank.rank is not None
        share = cpu_share(allowed, rank.rank, 2, cpu_cores(allowed)) or allowed
        # Every thread, MLX's own included, inherited the rank's slice.
        assert thread_cpus(rank.pid) == {describe_cpus(share)}
        log = (ring.run_dir / "logs" / f"rank{rank.rank}.log").read_text()
        assert ("pinned to CPUs" in log) == (share != allowed)


def test_api_restart_keeps_the_ranks_and_their_pids(ring: Ring) -> None:
    before = {p.rank: p.pid for p in ring.state.ranks}
    api = next(p for p in ring.state.processes if p.role == "api")
    os.kill(api.pid, signal.SIGKILL)
    with ring.http() as http, pytest.raises(httpx.ConnectError):
        http.get("/health/live")
    ring.launch("restart-api")
    assert {p.rank: p.pid for p in ring.state.ranks} == before
    assert all(pid_alive(pid) for pid in before.values())
    assert greedy(ring, HELLO, max_tokens=4).choices[0].message.content


def has_text(line: str) -> bool:
    """Whether an SSE line is a chunk with generated text (not the role chunk, which goes out
    as soon as rank 0 has queued the request)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def wait_idle(ring: Ring, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    with ring.http() as http:
        while True:
            info = http.get("/model/info").json()
            if info["running"] == info["queued"] == 0:
                return
            assert time.monotonic() < deadline, info
            time.sleep(0.1)


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    """A ring that generates one request at a time and lets one more wait."""
    run = tmp_path_factory.mktemp("one")
    with running_ring(run, models_dir, ranks=2, batch_size="1", queue_size="1") as ring:
        yield ring


def test_a_full_queue_answers_429(one_at_a_time: Ring, long_answer: dict[str, Any]) -> None:
    small = one_at_a_time
    generating, release = threading.Event(), threading.Event()

    def hold_the_ring() -> None:
        body = long_answer
        with (
            small.http() as http,
            http.stream("POST", "/v1/chat/completions", json=body) as stream,
        ):
            for line in stream.iter_lines():
                if has_text(line):
                    generating.set()
                if release.is_set():
                    return  # closing the stream cancels the request

    answers: queue.Queue[tuple[int, str]] = queue.Queue()

    def ask() -> None:
        body = {"model": "m", "messages": HELLO, "max_tokens": 2}
        with small.http() as http:
            reply = http.post("/v1/chat/completions", json=body)
        answers.put((reply.status_code, reply.text))

    holder = threading.Thread(target=hold_the_ring)
    holder.start()
    try:
        assert generating.wait(60)
        askers = [threading.Thread(target=ask) for _ in range(3)]
        for asker in askers:
            asker.start()
        # One request fits the queue; the other two are turned away at once.
        turned_away = [answers.get(timeout=60) for _ in range(2)]
        assert [status for status, _ in turned_away] == [429, 429], turned_away
        assert "queue is full" in turned_away[0][1]
    finally:
        release.set()
        holder.join(60)
    status, text = answers.get(timeout=120)
    assert status == 200, text
    for asker in askers:
        asker.join(60)


def test_a_model_three_ranks_cannot_split_fails_start(tmp_path: Path, models_dir: Path) -> None:
    # The tiny model's 8 heads do not divide by 3, and its 2 layers make no pipeline of 3.
    env = ring_env(tmp_path / "run", models_dir, ranks=3)
    result = launch(env, "start", check=False)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert "cannot be split by heads over 3 ranks" in output
    assert "cannot be split into a pipeline of 3 ranks: it has 2 layers" in output
    state_file = tmp_path / "run" / "state.json"
    if state_file.exists():
        pids = [p["pid"] for p in json.loads(state_file.read_text())["processes"]]
        assert not any(pid_alive(pid) for pid in pids)


def test_stop_leaves_no_process(tmp_path: Path, models_dir: Path) -> None:
    with running_ring(tmp_path / "run", models_dir, ranks=2) as short:
        pids = short.pids()
        assert all(pid_alive(pid) for pid in pids)
        short.launch("stop")
        assert not any(pid_alive(pid) for pid in pids)
        assert not (short.run_dir / "rank0.sock").exists()
        status = short.launch("status", check=False)
        assert status.returncode != 0 and "not running" in status.stderr + status.stdout


def test_a_waiting_stream_gets_keep_alive_comments(
    one_at_a_time: Ring, long_answer: dict[str, Any]
) -> None:
    """A streamed request waiting for room in the batch (or behind a long prefill) is kept
    alive with SSE comments, so proxies and clients do not time it out before its first token."""
    ring = one_at_a_time
    wait_idle(ring)  # the test before may have left a request leaving the batch
    long_body = long_answer
    generating, kept_alive = threading.Event(), threading.Event()

    def hold_the_ring() -> None:
        # Keeps the ring busy until the waiting stream was kept alive, then leaves.
        with ring.http() as http, http.stream("POST", "/v1/chat/completions", json=long_body) as s:
            for line in s.iter_lines():
                if has_text(line):
                    generating.set()
                if kept_alive.is_set():
                    break

    holder = threading.Thread(target=hold_the_ring)
    holder.start()
    lines: list[str] = []
    try:
        assert generating.wait(60)
        waiting = {"model": "m", "messages": HELLO, "max_tokens": 2, "stream": True}
        with ring.http() as http, http.stream("POST", "/v1/chat/completions", json=waiting) as s:
            for line in s.iter_lines():
                if line == ": keep-alive":
                    kept_alive.set()
                if line:
                    lines.append(line)
    finally:
        kept_alive.set()
        holder.join(120)
    finishes = [i for i, line in enumerate(lines) if '"finish_reason": "' in line]
    assert finishes, lines
    finish = finishes[0]
    assert ": keep-alive" in lines[:finish], lines[:5]
    assert lines[-1] == "data: [DONE]"
