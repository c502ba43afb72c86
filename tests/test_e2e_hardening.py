"""A hostile or careless client against a 2-rank ring with API keys: every bad input gets a
clear error in OpenAI's shape (never a 500, never a dead rank), a body is judged before it is
read, and one key's prompts stay out of another key's reach."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from ringserve.cluster.local import pid_alive, rss_bytes
from ringserve.ipc.framing import decode_reply, recv_frame
from ringserve.ipc.messages import Error
from ringserve.ipc.rank_server import EXTRA_CONNECTIONS
from tests.ring import Ring, no_eos, running_ring

pytestmark = pytest.mark.e2e

KEYS = ("key-one", "key-two")
ADMIN = "key-admin"
HELLO = [{"role": "user", "content": "Tell me about the ring of machines."}]
# The guarded ring's API: connections it holds, and seconds a client has to send a request.
CONNECTIONS = 48
READ_TIMEOUT = 3
# Stored responses: per key, and of all keys.
STORED_PER_KEY, STORED = 3, 4


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    run = tmp_path_factory.mktemp("guarded")
    run.chmod(0o755)  # made before, open to all: start makes it private
    # One request generated at a time: a request's choices then run one after another.
    with running_ring(
        run,
        models_dir,
        api_key=",".join(KEYS),
        admin_key=ADMIN,
        request_timeout="8",
        batch_size="1",
        api_max_connections=str(CONNECTIONS),
        api_read_timeout=str(READ_TIMEOUT),
        responses_stored_per_key=str(STORED_PER_KEY),
        responses_stored=str(STORED),
    ) as ring:
        yield ring


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    """A ring whose context is 64 tokens: a few kilobytes of text cannot fit it."""
    with running_ring(tmp_path_factory.mktemp("small"), models_dir, context_limit="64") as ring:
        yield ring


def post(ring: Ring, path: str, body: dict[str, Any], key: str | None = KEYS[0]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with ring.http() as http:
        return http.post(path, json=body, headers=headers)


def raw_body(ring: Ring, path: str, text: str, key: str = KEYS[0]) -> httpx.Response:
    """A body sent as it is (json= would refuse what it holds)."""
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    with ring.http() as http:
        return http.post(path, content=text.encode(), headers=headers)


def assert_error(reply: httpx.Response, status: int, fragment: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error
    return error


def read_answer(sock: socket.socket) -> str:
    """A whole HTTP answer (headers, then a body of its content-length) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def still_serving(ring: Ring) -> None:
    assert all(pid_alive(pid) for pid in ring.pids())
    reply = post(ring, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def test_top_k_beyond_the_vocabulary_keeps_every_token(ring: Ring) -> None:
    body = {"prompt": "hello", "max_tokens": 3, "top_k": 5000}
    reply = post(ring, "/v1/completions", body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3
    still_serving(ring)


@pytest.mark.parametrize(
    ("path", "text", "param"),
    [
        ("/v1/completions", '{"prompt": "\\ud800 hi", "max_tokens": 2}', "prompt"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 2}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}',
            "user",
        ),
        ("/v1/completions", '{"prompt": "hi", "stop": ["ok", "\\ud800"]}', "stop[1]"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    ring: Ring, path: str, text: str, param: str
) -> None:
    error = assert_error(raw_body(ring, path, text), 400, "surrogate")
    assert error["param"] == param
    still_serving(ring)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"logit_bias": {"²": 1}}, "logit_bias.²"),
        ({"logit_bias": {"12": 101}}, "logit_bias.12"),
        ({"repetition_penalty": 1e-300, "logprobs": 2}, "repetition_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "two"]}, "prompt"),
        ({"prompt": ["a", "b"], "n": 9}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"suffix": "and then"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_completion_parameters_out_of_bounds_are_readable_400s(
    ring: Ring, body: dict[str, Any], param: str
) -> None:
    reply = post(ring, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    error = assert_error(reply, 400, param)
    assert error["param"] == param
    assert "pydantic" not in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**63}, "seed"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{not json"},
                            }
                        ],
                    },
                    {"role": "user", "content": "and?"},
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_chat_parameters_out_of_bounds_are_readable_400s(
    ring: Ring, body: dict[str, Any], param: str
) -> None:
    reply = post(ring, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, **body})
    error = assert_error(reply, 400, param)
    assert error["param"] == param


def test_null_is_taken_for_an_absent_field(ring: Ring) -> None:
    body = {
        "model": None,
        "messages": HELLO,
        "max_tokens": 2,
        "temperature": None,
        "stop": None,
        "seed": None,
        "n": None,
        "stream_options": None,
        "logit_bias": None,
        "tools": None,
        "tool_choice": None,
    }
    reply = post(ring, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "ringserve-tiny"


def test_history_with_well_formed_tool_calls_is_accepted(ring: Ring) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    reply = post(ring, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def test_every_prompt_form_of_the_legacy_endpoint(ring: Ring) -> None:
    client = openai.OpenAI(base_url=f"{ring.url}/v1", api_key=KEYS[0])

    def complete(prompt: Any, **extra: Any) -> Any:
        return client.completions.create(
            model="m", prompt=prompt, max_tokens=3, temperature=0, **extra
        )

    text, ids = complete("the ring"), complete([40, 41, 42])
    assert ids.usage.prompt_tokens == 3
    texts = complete(["the ring", "the ring"], n=2)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    assert [c.text for c in texts.choices] == [text.choices[0].text] * 4
    assert texts.usage.prompt_tokens == 2 * text.usage.prompt_tokens
    assert texts.usage.completion_tokens == 12
    lists = complete([[40, 41, 42], [40, 41, 42]])
    assert [c.text for c in lists.choices] == [ids.choices[0].text] * 2
    echoed = complete([40, 41, 42], echo=True)
    assert echoed.choices[0].text.endswith(ids.choices[0].text)
    assert len(echoed.choices[0].text) > len(ids.choices[0].text)


def test_the_key_is_checked_before_a_byte_of_the_body_is_read(ring: Ring) -> None:
    api = next(p.pid for p in ring.state.processes if p.role == "api")
    before = rss_bytes(api) or 0
    url = urlsplit(ring.url)
    size = 96 * 2**20
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
        )
        sock.sendall(b"{" + b" " * 65536)  # a start; the rest is never sent
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 401"), answer
    assert '"invalid_api_key"' in answer
    assert (rss_bytes(api) or 0) - before < 16 * 2**20


def test_a_body_declared_larger_than_any_prompt_needs_is_refused_unread(small: Ring) -> None:
    url = urlsplit(small.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{"
        )
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "request_too_large" in answer


def test_a_client_that_sends_its_whole_body_before_reading_sees_the_413(small: Ring) -> None:
    # urllib writes the whole body, then reads: a connection closed under it would be a reset.
    body = json.dumps({"prompt": "x" * 20_000_000}).encode()
    request = urllib.request.Request(
        f"{small.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_cut_off_at_the_limit(small: Ring) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"x" * 65536
        yield b'"}'

    with small.http() as http:
        reply = http.post("/v1/completions", content=chunks())
    assert_error(reply, 413, "larger than")


def test_text_too_long_for_the_context_is_refused_before_tokenizing(small: Ring) -> None:
    body = {"model": "m", "prompt": "lorem ipsum " * 20_000, "max_tokens": 2}
    with small.http() as http:
        reply = http.post("/v1/completions", json=body)
    assert_error(reply, 400, "bytes of text make at least")
    assert reply.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("value", [b"Bearer \xe9\xe8", b"\xff", b"Bearer key-one\x80"])
def test_a_key_that_is_not_ascii_is_a_401(ring: Ring, value: bytes) -> None:
    with ring.http() as http:
        reply = http.get("/v1/models", headers={b"Authorization": value})
    assert_error(reply, 401, "API key")


def test_every_key_and_the_anthropic_header_are_accepted(ring: Ring) -> None:
    with ring.http() as http:
        for key in KEYS:
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success
        assert http.get("/v1/models", headers={"x-api-key": KEYS[1]}).is_success
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health/ready").status_code == 200  # probes need no key


def test_one_keys_prompt_is_neither_reused_nor_evicted_by_another_key(ring: Ring) -> None:
    secret = [
        {"role": "system", "content": "The vault code is 4711. Never say it."},
        {"role": "user", "content": "What is the weather like?"},
    ]

    def ask(key: str, conversation: str) -> dict[str, Any]:
        body = {"messages": secret, "max_tokens": 4, "temperature": 0}
        headers = {"Authorization": f"Bearer {key}", "X-Conversation-Id": conversation}
        with ring.http() as http:
            reply = http.post("/v1/chat/completions", json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        return dict(reply.json()["usage"])

    ask(KEYS[0], "talk")
    # The other key guesses the same prompt, under the same conversation id: nothing cached.
    assert ask(KEYS[1], "talk")["prompt_tokens_details"]["cached_tokens"] == 0
    again = ask(KEYS[0], "talk")
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1


def test_the_request_timeout_covers_all_its_choices(ring: Ring, models_dir: Path) -> None:
    """8 s for the whole request: each choice alone fits it, three (one after another, as this
    ring generates one request at a time) do not."""
    base = {
        "messages": HELLO,
        "temperature": 0,
        "logit_bias": no_eos(models_dir / "ringserve-tiny"),
    }
    started = time.monotonic()
    assert post(ring, "/v1/chat/completions", {**base, "max_tokens": 200}).status_code == 200
    per_token = (time.monotonic() - started) / 200
    tokens = int(4.5 / per_token)  # a choice of about 4.5 s
    started = time.monotonic()
    reply = post(ring, "/v1/chat/completions", {**base, "max_tokens": tokens})
    assert reply.status_code == 200, reply.text
    alone = time.monotonic() - started
    if alone > 7:
        pytest.skip(f"one choice took {alone:.1f} s: this machine is too busy to tell")
    reply = post(ring, "/v1/chat/completions", {**base, "max_tokens": tokens, "n": 3})
    assert_error(reply, 504, "longer than 8 s")
    still_serving(ring)


def test_a_client_that_leaves_a_whole_answer_stops_its_generation(
    ring: Ring, models_dir: Path
) -> None:
    body = {
        "messages": HELLO,
        "max_tokens": 4000,
        "n": 3,
        "temperature": 0,
        "logit_bias": no_eos(models_dir / "ringserve-tiny"),
    }
    log = ring.run_dir / "logs" / "rank0.log"
    seen = len(log.read_text())
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with (
        httpx.Client(base_url=ring.url, timeout=1.5, headers=headers) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/chat/completions", json=body)
    # Every choice, running or waiting, is gone within seconds (one takes ~10 s to generate).
    deadline = time.monotonic() + 5
    with httpx.Client(base_url=ring.url, timeout=10, headers=headers) as http:
        while (info := http.get("/model/info").json())["running"] + info["queued"]:
            assert time.monotonic() < deadline, f"the abandoned answer went on: {info}"
            time.sleep(0.1)
    since = log.read_text()[seen:]
    assert " cancelled: " in since and " length: " not in since
    still_serving(ring)


def test_rank_zeros_socket_bounds_idle_and_silent_connections(ring: Ring) -> None:
    path = str(ring.run_dir / "rank0.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(path)
    silent.sendall(struct.pack(">I", 64 * 2**20))  # a frame announced, then silence
    idle = []
    try:
        for _ in range(16 + 1 + EXTRA_CONNECTIONS):  # the queue, the batch, the extra: every slot
            idle.append(socket.socket(socket.AF_UNIX))
            idle[-1].connect(path)
        with socket.socket(socket.AF_UNIX) as one_more:
            one_more.connect(path)
            one_more.settimeout(10)
            body = recv_frame(one_more)
        assert body is not None
        refused = decode_reply(body)
        assert isinstance(refused, Error) and refused.code == "too_many_connections"
    finally:
        for connection in idle:
            connection.close()
    still_serving(ring)
    silent.settimeout(20)
    started = time.monotonic()
    assert silent.recv(1) == b""  # closed by rank 0 after its read timeout
    assert time.monotonic() - started < 15
    silent.close()


def test_health_says_nothing_of_the_socket_when_the_ranks_are_gone(
    tmp_path: Path, models_dir: Path
) -> None:
    with running_ring(tmp_path / "run", models_dir, ranks=1) as short:
        rank = short.state.ranks[0]
        os.killpg(rank.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(rank.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with short.http() as http:
            reply = http.get("/health/ready")
        assert reply.status_code == 503
        assert "sock" not in reply.text and str(short.run_dir) not in reply.text


# --- what a body may hold, how deep it may nest, what it may leave behind ---------------------


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(reply: httpx.Response) -> str:
    """The message of an error in OpenAI's shape or Anthropic's."""
    assert reply.headers["content-type"].startswith("application/json"), reply.text
    body = reply.json()
    return str(body["error"]["message"])


def many(item: bytes, count: int) -> bytes:
    return b",".join([item] * count)


HOSTILE_BODIES = {
    "400k one-character messages": (
        "/v1/chat/completions",
        lambda: b'{"messages":[' + many(b'{"role":"user","content":"a"}', 400_000) + b"]}",
        "JSON values",
    ),
    "3M token ids": (
        "/v1/completions",
        lambda: b'{"prompt":[' + many(b"7", 3_000_000) + b"]}",
        "JSON values",
    ),
    "a 24 MB field nobody reads": (
        "/v1/chat/completions",
        lambda: (
            b'{"messages":[{"role":"user","content":"a"}],"x":[' + many(b"0", 12_000_000) + b"]}"
        ),
        "JSON values",
    ),
    "40k tool_result blocks": (
        "/v1/messages",
        lambda: (
            b'{"max_tokens":2,"messages":[{"role":"user","content":['
            + many(b'{"type":"tool_result","tool_use_id":"t","content":"x"}', 40_000)
            + b"]}]}"
        ),
        "messages and content parts",
    ),
    "40k messages": (
        "/v1/chat/completions",
        lambda: b'{"messages":[' + many(b'{"role":"user","content":"a"}', 40_000) + b"]}",
        "messages and content parts",
    ),
    "40k input items": (
        "/v1/responses",
        lambda: b'{"input":[' + many(b'{"role":"user","content":"a"}', 40_000) + b"]}",
        "messages and content parts",
    ),
    "40k token ids": (
        "/v1/completions",
        lambda: b'{"prompt":[' + many(b"7", 40_000) + b"]}",
        "context limit is 32768",
    ),
    "17 prompts": ("/v1/completions", lambda: b'{"prompt":[' + many(b'"a"', 17) + b"]}", "16"),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_a_body_no_prompt_that_fits_needs_is_refused_before_it_is_walked(
    ring: Ring, name: str
) -> None:
    path, make, fragment = HOSTILE_BODIES[name]
    reply = raw_body(ring, path, make().decode())
    assert reply.status_code == 400, reply.text
    assert fragment in error_of(reply)


def nested_schema(levels: int) -> dict[str, Any]:
    """An object schema `levels` objects deep (two JSON levels each)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


Schema = dict[str, Any]
SCHEMA_ROUTES: dict[str, tuple[str, Callable[[Schema], Schema]]] = {
    "chat response_format": (
        "/v1/chat/completions",
        lambda s: {
            "messages": HELLO,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
        },
    ),
    "chat tools": (
        "/v1/chat/completions",
        lambda s: {
            "messages": HELLO,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": s}}],
        },
    ),
    "messages input_schema": (
        "/v1/messages",
        lambda s: {"max_tokens": 2, "messages": HELLO, "tools": [{"name": "f", "input_schema": s}]},
    ),
    "messages output_config": (
        "/v1/messages",
        lambda s: {
            "max_tokens": 2,
            "messages": HELLO,
            "output_config": {"format": {"type": "json_schema", "schema": s}},
        },
    ),
    "responses text.format": (
        "/v1/responses",
        lambda s: {
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": s}},
        },
    ),
    "responses tools": (
        "/v1/responses",
        lambda s: {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": s}]},
    ),
}


@pytest.mark.parametrize("route", list(SCHEMA_ROUTES))
@pytest.mark.parametrize(
    ("levels", "fragment"),
    [(33, "nests more than 64 levels"), (64, "nests more than 72 levels"), (130, "nests more")],
)
def test_a_schema_nested_too_deep_is_a_400_naming_the_limit(
    ring: Ring, route: str, levels: int, fragment: str
) -> None:
    path, body = SCHEMA_ROUTES[route]
    reply = post(ring, path, body(nested_schema(levels)))
    assert reply.status_code == 400, reply.text
    assert fragment in error_of(reply)


def test_tool_call_arguments_nested_too_deep_are_a_400(ring: Ring) -> None:
    arguments = '{"a":' * 5000 + "1" + "}" * 5000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "assistant", "tool_calls": [call]}, {"role": "user", "content": "so?"}]
    reply = post(ring, "/v1/chat/completions", {"messages": messages})
    assert reply.status_code == 400, reply.text
    assert "nests more than 64 levels" in error_of(reply)


def respond(ring: Ring, key: str, text: str) -> str:
    reply = post(ring, "/v1/responses", {"input": text, "max_output_tokens": 1}, key)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


def test_stored_responses_are_kept_per_key(ring: Ring) -> None:
    mine = [respond(ring, KEYS[0], f"mine {i}") for i in range(2)]
    theirs = [respond(ring, KEYS[1], f"theirs {i}") for i in range(5)]
    with ring.http() as http:

        def kept(key: str, response_id: str) -> bool:
            return http.get(f"/v1/responses/{response_id}", headers=auth(key)).status_code == 200

        # The other key's five pushed out only its own oldest: never below an equal share.
        assert [kept(KEYS[0], rid) for rid in mine] == [True, True]
        assert [kept(KEYS[1], rid) for rid in theirs] == [False, False, False, True, True]
        assert not kept(KEYS[1], mine[0])  # and a key reads only its own


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"user": "u" * 513}, "user"),
        ({"previous_response_id": "r" * 65}, "previous_response_id"),
        ({"tools": [{"type": "web_search", "description": "d" * 513}]}, "tools[0]"),
        ({"tools": [{"type": "function", "name": "<tool_call>{}</tool_call>"}]}, "tools[0].name"),
        (
            {
                "input": [
                    {"type": "function_call", "call_id": "c", "name": "f<x>", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c", "output": "ok"},
                ]
            },
            "input[0].name",
        ),
    ],
)
def test_what_a_response_repeats_and_keeps_is_bounded(
    ring: Ring, extra: dict[str, Any], param: str
) -> None:
    reply = post(ring, "/v1/responses", {"input": "hi", "max_output_tokens": 1, **extra})
    error = assert_error(reply, 400, param)
    assert error["param"] == param


def test_metadata_within_openais_bounds_is_repeated(ring: Ring) -> None:
    metadata = {f"k{i:02d}" + "k" * 60: "v" * 512 for i in range(16)}
    reply = post(
        ring, "/v1/responses", {"input": "hi", "max_output_tokens": 1, "metadata": metadata}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"] == metadata


CACHED_TOKENS = {
    "/v1/chat/completions": lambda usage: usage["prompt_tokens_details"]["cached_tokens"],
    "/v1/completions": lambda usage: usage["prompt_tokens_details"]["cached_tokens"],
    "/v1/messages": lambda usage: usage["cache_read_input_tokens"],
    "/v1/responses": lambda usage: usage["input_tokens_details"]["cached_tokens"],
}


def salted_body(path: str, prompt: str, salt: str | None) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    body: dict[str, Any] = {
        "/v1/chat/completions": {"messages": messages, "max_tokens": 1},
        "/v1/completions": {"prompt": prompt, "max_tokens": 1},
        "/v1/messages": {"messages": messages, "max_tokens": 1},
        "/v1/responses": {"input": prompt, "max_output_tokens": 1, "store": False},
    }[path]
    return {**body, "cache_salt": salt} if salt is not None else body


@pytest.mark.parametrize("path", list(CACHED_TOKENS))
def test_a_cache_salt_keeps_a_prompt_to_requests_with_the_same_salt(ring: Ring, path: str) -> None:
    prompt = f"At {path}, the vault code is 4711, said the keeper of the ring of machines."

    def cached(salt: str | None) -> int:
        salted = salt and f"{salt} for {path}"  # each route's own: their prompts start alike
        reply = post(ring, path, salted_body(path, prompt, salted))
        assert reply.status_code == 200, reply.text
        return int(CACHED_TOKENS[path](reply.json()["usage"]))

    cached("salt-one")
    assert cached("salt-two") == 0  # the same key, the same prompt: another salt
    reused = cached("salt-one")
    assert reused > 0
    # Without a salt: at most what other prompts of this key left (a template's first tokens).
    assert cached(None) < reused


def test_only_an_admin_key_sees_every_keys_activity(ring: Ring) -> None:
    with ring.http() as http:
        client = http.get("/model/info", headers=auth(KEYS[0])).json()
        admin = http.get("/model/info", headers=auth(ADMIN)).json()
        assert "prefix_cache" not in client and "prefix_cache" in admin
        assert {"queued", "running", "context_limit"} <= set(client)
        for key, shown in ((KEYS[0], False), (ADMIN, True)):
            ranks = http.get("/gpu/info", headers=auth(key)).json()["ranks"]
            assert all(("prefix_cache" in rank) is shown for rank in ranks)
            live = http.get("/console/state", headers=auth(key)).json()["live"]
            assert (live["prefix_cache_lookups"] is not None) is shown
        refused = http.get("/metrics", headers=auth(KEYS[1]))
        assert refused.status_code == 403
        assert "admin key" in refused.json()["error"]["message"]
        assert http.get("/metrics", headers=auth(ADMIN)).status_code == 200
        assert http.get("/v1/models", headers=auth(ADMIN)).status_code == 200


# --- the API process: connections, files ----------------------------------------------------


def api_pid(ring: Ring) -> int:
    return next(p.pid for p in ring.state.processes if p.role == "api")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts files through /proc")
def test_idle_connections_neither_exhaust_the_api_nor_lock_clients_out(ring: Ring) -> None:
    api = api_pid(ring)
    limits = Path(f"/proc/{api}/limits").read_text()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines() if "open files" in line)
    assert soft == hard  # raised as far as allowed
    log = ring.run_dir / "logs" / "api.log"
    logged = log.stat().st_size
    url = urlsplit(ring.url)
    with httpx.Client(base_url=ring.url, headers=auth(KEYS[0]), timeout=10) as kept:
        assert kept.get("/v1/models").is_success
        idle = [socket.create_connection((url.hostname, url.port)) for _ in range(300)]
        try:
            time.sleep(0.5)
            assert len(list(Path(f"/proc/{api}/fd").iterdir())) < CONNECTIONS + 64
            assert kept.get("/v1/models").is_success
            with httpx.Client(base_url=ring.url, headers=auth(KEYS[1]), timeout=10) as fresh:
                assert fresh.get("/v1/models").is_success
            idle[-1].settimeout(READ_TIMEOUT + 5)
            assert idle[-1].recv(1) == b""  # the newest too, once its time is up
        finally:
            for sock in idle:
                sock.close()
    assert log.stat().st_size - logged < 64 * 1024  # no line for each connection


def test_the_run_directory_and_its_files_are_private(ring: Ring) -> None:
    assert stat.S_IMODE(ring.run_dir.stat().st_mode) == 0o700
    found = list(ring.run_dir.rglob("*"))
    assert any(p.name == "api.log" for p in found) and any(p.name == "state.json" for p in found)
    for path in found:
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
