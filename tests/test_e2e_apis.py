"""The other APIs clients speak, on a real 2-rank ring with API keys, through the official
SDKs: Anthropic's Messages (`anthropic`), OpenAI's Responses (`openai`'s `responses`), and the
Prometheus exposition at /metrics (read with `prometheus_client`'s own parser).

The tiny model's weights are random: it calls a tool only when made to (`tool_choice` any or
named; required), which decoding enforces, and it rarely ends on its own, so most answers end
at their token limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ring import Ring, running_ring

pytestmark = pytest.mark.e2e

KEY, OTHER_KEY = "key-one", "key-two"
ADMIN_KEY = "key-admin"  # sees every key's activity: /metrics
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
ASK = "What time is it?"
# The anthropic SDK no longer offers temperature; the API still takes it.
GREEDY = {"temperature": 0}
# The server's max_tokens limit on this ring.
TOKEN_LIMIT = 64


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    keys = f"{KEY},{OTHER_KEY}"
    with running_ring(
        tmp_path_factory.mktemp("apis"),
        models_dir,
        api_key=keys,
        admin_key=ADMIN_KEY,
        max_tokens_limit=str(TOKEN_LIMIT),
        default_max_tokens=str(TOKEN_LIMIT),
    ) as ring:
        yield ring


def claude(ring: Ring, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=ring.url, api_key=key, max_retries=0)


def gpt(ring: Ring, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ring.url}/v1", api_key=key, max_retries=0)


def events_of(reply: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """A server-sent event stream's (event name, data) pairs; comments left out."""
    events, name = [], ""
    for line in reply.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


# --- Anthropic Messages ---

CLAUDE_TOOLS: list[Any] = [
    {"name": "get_time", "description": "The time in a zone", "input_schema": TIME_SCHEMA}
]


def test_a_message_whole_and_streamed_are_the_same_answer(ring: Ring) -> None:
    body: Any = {
        "model": "m",
        "max_tokens": 12,
        "system": "Answer briefly.",
        "messages": [{"role": "user", "content": ASK}],
    }
    whole = claude(ring).messages.create(**body, extra_body=GREEDY)
    assert whole.id.startswith("msg_") and whole.type == "message" and whole.model == "m"
    assert whole.stop_reason == "max_tokens" and whole.stop_sequence is None
    assert [block.type for block in whole.content] == ["text"]
    assert whole.usage.output_tokens == 12
    with claude(ring).messages.stream(**body, extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].model_dump() == whole.content[0].model_dump()
    assert (streamed.stop_reason, streamed.usage.output_tokens) == ("max_tokens", 12)
    cached, cached_before = (
        streamed.usage.cache_read_input_tokens,
        whole.usage.cache_read_input_tokens,
    )
    assert cached is not None and cached_before is not None
    assert cached > 0  # the same prompt again: from the cache
    assert streamed.usage.input_tokens + cached == whole.usage.input_tokens + cached_before

    with (
        ring.http() as http,
        http.stream(
            "POST",
            "/v1/messages",
            json={**body, **GREEDY, "stream": True},
            headers={"x-api-key": KEY},
        ) as reply,
    ):
        events = events_of(reply)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_a_stop_sequence_ends_the_message_before_it(ring: Ring) -> None:
    body: Any = {"model": "m", "max_tokens": 16, "extra_body": GREEDY}
    messages: Any = [{"role": "user", "content": "Tell me something"}]
    answer = claude(ring).messages.create(**body, messages=messages)
    text = "".join(block.text for block in answer.content if block.type == "text")
    stop = text.strip()[-6:-3]
    assert len(stop) == 3
    stopped = claude(ring).messages.create(**body, messages=messages, stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    kept = "".join(block.text for block in stopped.content if block.type == "text")
    assert kept == text[: text.index(stop)]


def test_a_tool_round_trip_streamed_and_not(ring: Ring) -> None:
    messages: list[Any] = [{"role": "user", "content": ASK}]
    body: Any = {"model": "m", "max_tokens": 60, "tools": CLAUDE_TOOLS, "extra_body": GREEDY}
    called = claude(ring).messages.create(**body, messages=messages, tool_choice={"type": "any"})
    assert called.stop_reason == "tool_use"
    use = called.content[-1]
    assert use.type == "tool_use" and use.name == "get_time"
    jsonschema.validate(use.input, TIME_SCHEMA)

    named: Any = {"type": "tool", "name": "get_time"}
    with claude(ring).messages.stream(**body, messages=messages, tool_choice=named) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert streamed.content[-1].input == use.input  # type: ignore[union-attr]

    messages += [
        {"role": "assistant", "content": called.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "12:00"},
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]
    counted = claude(ring).messages.count_tokens(model="m", messages=messages, tools=CLAUDE_TOOLS)
    answered = claude(ring).messages.create(**{**body, "max_tokens": 4}, messages=messages)
    assert answered.stop_reason == "max_tokens"
    usage = answered.usage
    assert usage.cache_read_input_tokens > 0  # the conversation so far came from the cache
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens


def test_max_tokens_is_a_ceiling_as_claude_code_sends_it(ring: Ring) -> None:
    # Claude Code asks for 32000 whatever the model: Anthropic's max_tokens is a ceiling.
    with claude(ring).messages.stream(
        model="m", max_tokens=32000, messages=[{"role": "user", "content": ASK}], extra_body=GREEDY
    ) as stream:
        message = stream.get_final_message()
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", TOKEN_LIMIT)
    with pytest.raises(openai.BadRequestError):  # OpenAI's is a demand, refused when too big
        gpt(ring).chat.completions.create(
            model="m", max_tokens=32000, messages=[{"role": "user", "content": ASK}]
        )


def test_a_tools_picture_is_named_not_refused(ring: Ring) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    messages: Any = [
        {"role": "user", "content": ASK},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}],
        },
    ]
    answer = claude(ring).messages.create(
        model="m", max_tokens=2, messages=messages, tools=CLAUDE_TOOLS, extra_body=GREEDY
    )
    assert answer.stop_reason == "max_tokens"


def test_messages_errors_are_in_anthropics_shape(ring: Ring) -> None:
    with pytest.raises(anthropic.AuthenticationError) as no_key:
        claude(ring, key="wrong").messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": ASK}]
        )
    assert no_key.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid or missing API key"},
    }
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    wrong_bodies: list[tuple[dict[str, Any], str]] = [
        ({"messages": [{"role": "user", "content": ASK}]}, "max_tokens"),
        ({"max_tokens": 4, "messages": [{"role": "user", "content": [image]}]}, "text only"),
        (
            {"max_tokens": 4, "temperature": 1.5, "messages": [{"role": "user", "content": ASK}]},
            "temperature",
        ),
        ({"max_tokens": 4, "messages": [{"role": "assistant", "content": "Hi"}]}, "prefill"),
    ]
    with ring.http() as http:
        for body, says in wrong_bodies:
            reply = http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
            assert reply.status_code == 400, body
            error = reply.json()
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert says in error["error"]["message"]
        missing = http.post("/v1/messages/batches", json={}, headers={"x-api-key": KEY})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


# --- OpenAI Responses ---

GPT_TOOLS: list[Any] = [
    {"type": "function", "name": "get_time", "description": "The time", "parameters": TIME_SCHEMA}
]


def test_a_response_whole_and_streamed_are_the_same_answer(ring: Ring) -> None:
    body: Any = {
        "model": "m",
        "input": ASK,
        "instructions": "Answer briefly.",
        "max_output_tokens": 12,
        "temperature": 0,
    }
    whole = gpt(ring).responses.create(**body)
    assert whole.id.startswith("resp_") and whole.object == "response"
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in whole.output] == ["message"]
    assert whole.usage is not None and whole.usage.output_tokens == 12
    assert whole.instructions == "Answer briefly." and whole.max_output_tokens == 12

    # The SDK's accumulator checks every event's place; it raises on one out of order.
    with gpt(ring).responses.stream(**body) as stream:
        events = list(stream)
    names = [event.type for event in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == whole.output_text
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text


def test_a_function_call_continued_by_previous_response_id(ring: Ring) -> None:
    body: Any = {"model": "m", "tools": GPT_TOOLS, "max_output_tokens": 60, "temperature": 0}
    with gpt(ring).responses.stream(**body, input=ASK, tool_choice="required") as stream:
        called = stream.get_final_response()
    assert called.status == "completed"
    call = called.output[-1]
    assert call.type == "function_call" and call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME_SCHEMA)
    kept = gpt(ring).responses.retrieve(called.id).output[-1]
    assert kept.model_dump() == call.model_dump(exclude={"parsed_arguments"})

    output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}]
    answered = gpt(ring).responses.create(
        **{**body, "max_output_tokens": 4}, input=output, previous_response_id=called.id
    )
    assert answered.previous_response_id == called.id
    assert answered.usage is not None and answered.usage.input_tokens_details.cached_tokens > 0

    with pytest.raises(openai.NotFoundError):  # another key's client cannot read it
        gpt(ring, OTHER_KEY).responses.retrieve(called.id)
    gpt(ring).responses.delete(called.id)
    with pytest.raises(openai.NotFoundError):
        gpt(ring).responses.retrieve(called.id)
    with pytest.raises(openai.BadRequestError) as gone:
        gpt(ring).responses.create(**body, input="More?", previous_response_id=called.id)
    assert gone.value.code == "previous_response_not_found"
    assert gone.value.param == "previous_response_id"


def test_a_response_held_to_a_json_schema(ring: Ring) -> None:
    schema = {
        "type": "object",
        "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["hour"],
        "additionalProperties": False,
    }
    text_format: Any = {"format": {"type": "json_schema", "name": "t", "schema": schema}}
    reply = gpt(ring).responses.create(model="m", input=ASK, text=text_format, max_output_tokens=40)
    jsonschema.validate(json.loads(reply.output_text), schema)
    assert reply.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_a_developer_message_reaches_a_template_without_that_role(ring: Ring) -> None:
    # The demo model's template (Qwen's) knows no developer role: it gets a system turn.
    body: Any = {"model": "m", "max_output_tokens": 6, "temperature": 0}
    ask: Any = {"role": "user", "content": ASK}
    developer: Any = [{"role": "developer", "content": "Answer briefly."}, ask]
    system: Any = [{"role": "system", "content": "Answer briefly."}, ask]
    as_developer = gpt(ring).responses.create(**body, input=developer)
    as_system = gpt(ring).responses.create(**body, input=system)
    assert as_developer.usage is not None and as_system.usage is not None
    assert as_developer.usage.input_tokens == as_system.usage.input_tokens
    assert as_developer.output_text == as_system.output_text


def test_a_namespaced_function_is_called_in_its_namespace(ring: Ring) -> None:
    # As Codex sends its tools: functions, a namespace of functions, a hosted tool.
    tools: Any = [
        {"type": "namespace", "name": "clock", "description": "Clocks", "tools": GPT_TOOLS},
        {"type": "web_search", "external_web_access": False},
    ]
    reply = gpt(ring).responses.create(
        model="m",
        input=ASK,
        tools=tools,
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=60,
    )
    call = reply.output[-1]
    assert call.type == "function_call" and call.name == "get_time"
    assert call.model_dump()["namespace"] == "clock"


def test_responses_refuse_what_they_cannot_do(ring: Ring) -> None:
    refused_bodies: list[tuple[dict[str, Any], str]] = [
        ({"input": ASK, "background": True}, "background"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ]
    for body, param in refused_bodies:
        with pytest.raises(openai.BadRequestError) as refused:
            gpt(ring).responses.create(model="m", **body)
        assert refused.value.param == param


# --- Prometheus ---


def scrape(ring: Ring) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with ring.http() as http:
        reply = http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_metrics_move_with_real_requests(ring: Ring) -> None:
    with ring.http() as http:
        assert http.get("/metrics").status_code == 401  # protected like every route
        client = {"Authorization": f"Bearer {KEY}"}
        assert http.get("/metrics", headers=client).status_code == 403  # an admin's view
    before = scrape(ring)
    chat_reply = gpt(ring).chat.completions.create(
        model="m", messages=[{"role": "user", "content": ASK}], max_tokens=5
    )
    message = claude(ring).messages.create(
        model="m", max_tokens=3, messages=[{"role": "user", "content": ASK}]
    )
    after = scrape(ring)
    assert chat_reply.usage is not None
    generated = chat_reply.usage.completion_tokens + message.usage.output_tokens
    prompts = (
        chat_reply.usage.prompt_tokens
        + message.usage.input_tokens
        + (message.usage.cache_read_input_tokens or 0)
    )

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat = {"endpoint": "/v1/chat/completions", "method": "POST", "status": "200"}
    assert moved("ringserve_requests_total", **chat) == 1
    messages = {"endpoint": "/v1/messages", "method": "POST", "status": "200"}
    assert moved("ringserve_requests_total", **messages) == 1
    assert moved("ringserve_completion_tokens_total") == generated > 0
    assert moved("ringserve_prompt_tokens_total") == prompts
    reasons = ("stop", "length", "tool_calls", "cancelled")
    assert sum(moved("ringserve_generations_total", finish_reason=r) for r in reasons) == 2
    assert moved("ringserve_time_to_first_token_seconds_count") == 2
    assert moved("ringserve_queue_wait_seconds_count") == 2
    unauthorised = {"endpoint": "/metrics", "method": "GET", "status": "401"}
    assert after[("ringserve_requests_total", tuple(sorted(unauthorised.items())))] >= 1
    assert after[("ringserve_ready", ())] == 1
    assert after[("ringserve_ranks", ())] == 2
    assert after[("ringserve_rank_up", (("rank", "0"),))] == 1
    assert after[("ringserve_rank_up", (("rank", "1"),))] == 1
    assert after[("ringserve_prefix_cache_entries", ())] > 0
    memory = [value for (name, _), value in after.items() if name == "ringserve_host_memory_bytes"]
    assert len(memory) == 2 and all(value > 0 for value in memory)
