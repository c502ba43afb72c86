"""What agents need, on 2-rank rings: tool calls in OpenAI's shape (streamed and not), answers
held to a JSON schema, and a model's thinking kept apart from its answer.

The tiny model's weights are random, so it calls a tool only when made to: `tool_choice`
required or named, which decoding enforces (the calls then validate against their schemas).
Its tokenizer and chat template write tool calls and thinking as Qwen3 does, so mlx-lm's own
parser reads them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import jsonschema
import openai
import pytest
from mlx_lm.utils import load_tokenizer
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from ringserve.model.demo import ensure_demo_model
from tests.ring import Ring, running_ring

pytestmark = pytest.mark.e2e

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Oslo", "Paris", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city for the next days",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time", "parameters": TIME_PARAMETERS},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Oslo this week?"}]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "sunny": {"type": "boolean"},
        "rating": {"type": "integer", "minimum": 0, "maximum": 9},
        "mood": {"type": "string", "enum": ["glad", "sad"]},
    },
    "required": ["sunny", "rating", "mood"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    with running_ring(tmp_path_factory.mktemp("agents"), models_dir) as ring:
        yield ring


def client(ring: Ring) -> Any:
    return openai.OpenAI(base_url=f"{ring.url}/v1", api_key="unused", max_retries=0)


def assert_valid_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_a_required_tool_call_in_openai_shape(ring: Ring) -> None:
    reply = client(ring).chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call)


# A call with a long argument: its arguments take many tokens to write.
NOTE_PARAMETERS = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 32, "maxLength": 48}},
    "required": ["text"],
    "additionalProperties": False,
}
NOTE_DESCRIPTION = "Write a note"
NOTE = {
    "type": "function",
    "function": {
        "name": "write_note",
        "description": NOTE_DESCRIPTION,
        "parameters": NOTE_PARAMETERS,
    },
}
# Greedy: the same answer streamed or not.
NOTE_CALL: dict[str, Any] = {
    "model": "m",
    "messages": ASK,
    "tools": [NOTE],
    "tool_choice": {"type": "function", "function": {"name": "write_note"}},
    "max_tokens": 200,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def note(ring: Ring) -> Any:
    """The long call, whole (not streamed)."""
    return client(ring).chat.completions.create(**NOTE_CALL)


def sse_data(ring: Ring, path: str, body: dict[str, Any]) -> list[Any]:
    """The data of each server-sent event of a streamed answer, as it came (`[DONE]` left out
    after checking it ends the stream, where it is sent)."""
    with ring.http() as http, http.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200
        data = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    if path == "/v1/chat/completions":
        assert data.pop() == "[DONE]"
    return [json.loads(item) for item in data]


def accumulated(chunks: list[dict[str, Any]]) -> tuple[ChatCompletionStreamState[Any], list[Any]]:
    """The openai SDK's accumulation of a chat stream's chunks, and the events it saw in them."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    events = [
        event
        for chunk in chunks
        for event in state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    ]
    return state, events


def the_same_answer(chunks: list[dict[str, Any]]) -> None:
    """Every chunk of a chat stream names the same answer, as OpenAI's do."""
    names = {
        (c["id"], c["object"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks
    }
    assert len(names) == 1, names
    [(answer_id, kind, _, _, fingerprint)] = names
    assert answer_id.startswith("chatcmpl-") and kind == "chat.completion.chunk"
    assert fingerprint.startswith("fp_")


def test_a_text_stream_is_shaped_chunk_by_chunk_as_openais(ring: Ring) -> None:
    body: dict[str, Any] = {"model": "m", "messages": ASK, "max_tokens": 12, "temperature": 0}
    whole = client(ring).chat.completions.create(**body)
    usage_asked = {"stream": True, "stream_options": {"include_usage": True}}
    *chunks, usage = sse_data(ring, "/v1/chat/completions", {**body, **usage_asked})
    the_same_answer([*chunks, usage])
    assert chunks[0]["system_fingerprint"] == whole.system_fingerprint
    assert [len(c["choices"]) for c in chunks] == [1] * len(chunks)
    assert all(c["usage"] is None for c in chunks)  # null but in the last chunk
    assert usage["choices"] == []
    counts = usage["usage"]["prompt_tokens"], usage["usage"]["completion_tokens"]
    assert counts == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    choices = [c["choices"][0] for c in chunks]
    first, *texts, last = [choice["delta"] for choice in choices]
    assert first == {"role": "assistant", "content": ""}
    assert texts and all(list(delta) == ["content"] and delta["content"] for delta in texts)
    assert last == {}
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert {c["logprobs"] for c in choices} == {None}
    assert "".join(delta["content"] for delta in texts) == whole.choices[0].message.content

    # The SDK's accumulation of these chunks (its final completion refuses an answer cut at its
    # length: what it accumulated is its snapshot).
    state, _ = accumulated([*chunks, usage])
    message = state.current_completion_snapshot.choices[0]
    assert (message.message.content, message.finish_reason) == (
        whole.choices[0].message.content,
        "length",
    )


def test_a_long_call_streams_its_arguments_as_they_are_written(ring: Ring, note: Any) -> None:
    assert note.choices[0].finish_reason == "tool_calls"
    message = note.choices[0].message
    [called] = message.tool_calls
    jsonschema.validate(json.loads(called.function.arguments), NOTE_PARAMETERS)

    *chunks, usage = sse_data(
        ring,
        "/v1/chat/completions",
        {**NOTE_CALL, "stream": True, "stream_options": {"include_usage": True}},
    )
    the_same_answer([*chunks, usage])
    assert usage["usage"]["completion_tokens"] == note.usage.completion_tokens
    choices = [c["choices"][0] for c in chunks]
    first, *fragments, last = [choice["delta"] for choice in choices]
    # The first delta names the call, with no arguments yet and no content (there is none).
    head = first["tool_calls"][0]
    assert head["id"].startswith("call_")
    assert first == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": head["id"],
                "type": "function",
                "function": {"name": "write_note", "arguments": ""},
            }
        ],
    }
    # Then the arguments, a piece at a time: exactly the whole answer's.
    pieces = [delta["tool_calls"][0]["function"]["arguments"] for delta in fragments]
    assert fragments == [
        {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces
    ]
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == called.function.arguments
    assert last == {} and choices[-1]["finish_reason"] == "tool_calls"

    # The SDK's own accumulation makes of these chunks the message the whole answer is.
    state, events = accumulated([*chunks, usage])
    assert sum(event.type == "tool_calls.function.arguments.delta" for event in events) > 1
    final = state.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    streamed = final.choices[0].message
    assert (
        (streamed.role, streamed.content) == (message.role, message.content) == ("assistant", None)
    )
    [streamed_call] = streamed.tool_calls or []
    assert streamed_call.function.model_dump(exclude={"parsed_arguments"}) == (
        called.function.model_dump()
    )
    assert streamed_call.type == "function" and streamed_call.id.startswith("call_")


CLAUDE_NOTE: dict[str, Any] = {
    "model": "m",
    "max_tokens": 200,
    "messages": ASK,
    "tools": [
        {"name": "write_note", "description": NOTE_DESCRIPTION, "input_schema": NOTE_PARAMETERS}
    ],
    "tool_choice": {"type": "tool", "name": "write_note"},
}
RESPONSES_NOTE: dict[str, Any] = {
    "model": "m",
    "input": ASK,
    "tools": [
        {
            "type": "function",
            "name": "write_note",
            "description": NOTE_DESCRIPTION,
            "parameters": NOTE_PARAMETERS,
        }
    ],
    "tool_choice": {"type": "function", "name": "write_note"},
    "max_output_tokens": 200,
    "temperature": 0,
}


def claude(ring: Ring) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=ring.url, api_key="unused", max_retries=0)


def test_anthropic_and_responses_stream_a_call_as_it_is_written(ring: Ring, note: Any) -> None:
    whole = claude(ring).messages.create(**CLAUDE_NOTE, extra_body={"temperature": 0})
    [use] = whole.content
    assert use.type == "tool_use" and whole.stop_reason == "tool_use"
    events = sse_data(ring, "/v1/messages", {**CLAUDE_NOTE, "temperature": 0, "stream": True})
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    block = events[1]["content_block"]
    assert block == {"type": "tool_use", "id": block["id"], "name": "write_note", "input": {}}
    deltas = [event["delta"] for event in events[2:-3]]
    assert {delta["type"] for delta in deltas} == {"input_json_delta"} and len(deltas) > 1
    assert json.loads("".join(delta["partial_json"] for delta in deltas)) == use.input
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"

    # Responses: the same prompt as the chat completion's.
    with client(ring).responses.stream(**RESPONSES_NOTE) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        response = stream.get_final_response()
    [item] = response.output
    assert item.type == "function_call" and item.name == "write_note"
    arguments = note.choices[0].message.tool_calls[0].function.arguments
    assert len(pieces) > 1 and "".join(pieces) == item.arguments == arguments


def test_a_call_cut_by_max_tokens_leaves_no_half_call_and_no_markup(ring: Ring, note: Any) -> None:
    whole_arguments = note.choices[0].message.tool_calls[0].function.arguments
    limit = note.usage.completion_tokens // 2  # inside the arguments: past the call's head
    cut = client(ring).chat.completions.create(**{**NOTE_CALL, "max_tokens": limit})
    choice = cut.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.tool_calls and not choice.message.content

    chunks = sse_data(
        ring, "/v1/chat/completions", {**NOTE_CALL, "max_tokens": limit, "stream": True}
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(delta.get("content") for delta in deltas)  # no markup
    # Streamed, what went out of the call as it was written is the start of the whole call,
    # and the finish says it was cut.
    pieces = [piece for delta in deltas for piece in delta.get("tool_calls", ())]
    assert [piece["function"]["name"] for piece in pieces if "id" in piece] == ["write_note"]
    written = "".join(piece["function"]["arguments"] for piece in pieces)
    assert whole_arguments.startswith(written) and written != whole_arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # Nor does any other API's whole answer (the limit cut them: they end at it).
    message = claude(ring).messages.create(
        **{**CLAUDE_NOTE, "max_tokens": limit}, extra_body={"temperature": 0}
    )
    assert message.stop_reason == "max_tokens" and message.content == []
    response = client(ring).responses.create(**{**RESPONSES_NOTE, "max_output_tokens": limit})
    assert response.status == "incomplete" and response.output == []


def test_a_required_call_of_a_tool_whose_schema_has_references(ring: Ring) -> None:
    """Tools made from pydantic models refer to their parts through `$defs`."""
    place = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    parameters = {
        "$defs": {"Place": place},
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}},
        "required": ["where"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "visit", "parameters": parameters}}]
    reply = client(ring).chat.completions.create(
        model="m", messages=ASK, tools=tools, tool_choice="required", max_tokens=60, temperature=0
    )
    call = reply.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_markers_in_the_conversation_or_in_a_completion_are_text(
    ring: Ring, models_dir: Path
) -> None:
    asking = [{"role": "user", "content": "What does the <think> tag do?"}]
    reply = client(ring).chat.completions.create(
        model="m", messages=asking, max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content  # not taken for an open think block
    think = load_tokenizer(ensure_demo_model(models_dir, "tiny")).convert_tokens_to_ids("<think>")
    body = {"prompt": "a", "max_tokens": 3, "temperature": 0, "logit_bias": {str(think): 100}}
    with ring.http() as http:
        completed = http.post("/v1/completions", json=body).json()
    assert completed["choices"][0]["text"] == "<think>" * 3  # a completion is its text


def test_template_parameters_cannot_be_set_by_a_client(ring: Ring) -> None:
    body = {
        "model": "m",
        "messages": ASK,
        "chat_template_kwargs": {"chat_template": "{{ 'a' * 10**10 }}"},
    }
    with ring.http() as http:
        reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "chat_template_kwargs"


def test_tool_choice_none_offers_no_tools(ring: Ring) -> None:
    offered = client(ring).chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0
    )
    withheld = client(ring).chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert withheld.usage.prompt_tokens < offered.usage.prompt_tokens  # not in the prompt
    assert not withheld.choices[0].message.tool_calls


def test_a_tool_loop_goes_on_with_the_result(ring: Ring) -> None:
    first = client(ring).chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    second = client(ring).chat.completions.create(
        model="m", messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_answers_held_to_a_json_schema(ring: Ring, stream: bool) -> None:
    formats = {
        "schema": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": ANSWER_SCHEMA, "strict": True},
        },
        "object": {"type": "json_object"},
    }
    for question in ("Hi", "Tell me about the ring.", "Count to ten."):
        for kind, response_format in formats.items():
            text = complete_text(ring, question, response_format, stream)
            value = json.loads(text)
            assert isinstance(value, dict)
            if kind == "schema":
                jsonschema.validate(value, ANSWER_SCHEMA)


def complete_text(ring: Ring, question: str, response_format: Any, stream: bool) -> str:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": question}],
        "response_format": response_format,
        "max_tokens": 400,
        "temperature": 0,
    }
    if not stream:
        reply = client(ring).chat.completions.create(**body)
        assert reply.choices[0].finish_reason == "stop"
        return str(reply.choices[0].message.content)
    text = ""
    for chunk in client(ring).chat.completions.create(**body, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def test_a_schema_that_cannot_be_enforced_is_a_400(ring: Ring) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client(ring).chat.completions.create(
            model="m",
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert "nonsense" in str(caught.value)


def test_every_rank_decides_alike_with_constrained_requests(ring: Ring) -> None:
    with ring.http() as http:
        first, second = (r["prefix_cache"] for r in http.get("/gpu/info").json()["ranks"])
    assert first == second and first["hits"] + first["misses"] > 0


def test_a_langchain_agent_completes_a_tool_round_trip(ring: Ring) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return f"12:00 {zone}"

    settings: dict[str, Any] = {"api_key": "unused", "max_tokens": 60, "temperature": 0}
    llm = ChatOpenAI(base_url=f"{ring.url}/v1", model="m", **settings)
    agent = llm.bind_tools([get_time], tool_choice="get_time")
    messages: list[Any] = [HumanMessage("What time is it in Oslo?")]
    called = agent.invoke(messages)
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_time"
    messages += [
        called,
        ToolMessage(get_time.invoke(called.tool_calls[0]), tool_call_id=called.tool_calls[0]["id"]),
    ]
    answer = llm.bind_tools([get_time]).invoke(messages)
    assert isinstance(answer.content, str) and not answer.tool_calls


# A chat template that opens the think block itself (as Qwen3-Thinking's and DeepSeek-R1's do)
# and knows no tools.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    tiny = ensure_demo_model(models_dir, "tiny")
    model = tmp_path_factory.mktemp("thinker") / "model"
    model.mkdir()
    for item in tiny.iterdir():
        if item.name != "tokenizer_config.json":
            (model / item.name).symlink_to(item)
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    run = tmp_path_factory.mktemp("thinker-run")
    with running_ring(run, models_dir, model=str(model)) as ring:
        yield ring
    shutil.rmtree(model)


def test_thinking_goes_to_reasoning_content_streamed_or_not(thinker: Ring) -> None:
    body = {"model": "m", "messages": ASK, "max_tokens": 24, "temperature": 0}
    whole = client(thinker).chat.completions.create(**body).choices[0].message
    reasoning = whole.model_dump().get("reasoning_content")
    assert reasoning and whole.content == ""
    streamed_reasoning, streamed_content = "", ""
    for chunk in client(thinker).chat.completions.create(**body, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta.model_dump()
            streamed_reasoning += delta.get("reasoning_content") or ""
            streamed_content += delta.get("content") or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, "")
    plain = client(thinker).chat.completions.create(
        **body, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert plain.choices[0].message.content
    assert not plain.choices[0].message.model_dump().get("reasoning_content")


def test_a_thinking_answer_held_to_a_schema_closes_its_think_block(thinker: Ring) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": ANSWER_SCHEMA}}
    reply = client(thinker).chat.completions.create(
        model="m", messages=ASK, max_tokens=60, temperature=0, response_format=response_format
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), ANSWER_SCHEMA)


def test_tools_for_a_model_without_tool_calling_are_a_400(thinker: Ring) -> None:
    with thinker.http() as http:
        reply = http.post(
            "/v1/chat/completions", json={"model": "m", "messages": ASK, "tools": TOOLS}
        )
    assert reply.status_code == 400
    assert "no tool calling" in reply.json()["error"]["message"]


def test_anthropic_thinking_blocks_follow_the_thinking_setting(thinker: Ring) -> None:
    claude = anthropic.Anthropic(base_url=thinker.url, api_key="unused", max_retries=0)
    body: Any = {
        "model": "m",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": ASK[0]["content"]}],
        "extra_body": {"temperature": 0},
    }
    thought = claude.messages.create(**body, thinking={"type": "adaptive"})
    assert [block.type for block in thought.content] == ["thinking"]
    with claude.messages.stream(**body, thinking={"type": "adaptive"}) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].thinking == thought.content[0].thinking  # type: ignore[union-attr]
    plain = claude.messages.create(**body, thinking={"type": "disabled"})
    assert [block.type for block in plain.content] == ["text"]
    unasked = claude.messages.create(**body)  # as Claude answers: thinking only when asked
    assert [block.type for block in unasked.content] == ["text"]


def test_responses_reasoning_items_follow_the_effort(thinker: Ring) -> None:
    body: Any = {"model": "m", "input": ASK[0]["content"], "max_output_tokens": 24}
    reasoned = thinker.client().responses.create(**body, reasoning={"effort": "high"})
    assert [item.type for item in reasoned.output] == ["reasoning"]
    reasoning = reasoned.output[0]
    assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
    assert reasoned.usage is not None and reasoned.usage.output_tokens_details.reasoning_tokens > 0
    plain = thinker.client().responses.create(**body, reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"]
