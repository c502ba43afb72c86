"""Request bodies weighed before they are parsed, and what the API keeps of them: the shape of
JSON text read off its bytes, the bounds a body is held to before validation, nesting, the
stored responses' share per key."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ringserve.api.anthropic_messages import MessagesBody
from ringserve.api.bodies import parse_body
from ringserve.api.guard import cache_scope, salted_scope
from ringserve.api.openai_responses import ResponsesBody, ResponseStore, StoredResponse
from ringserve.api.schemas import ChatCompletionBody, CompletionBody, RequestBody
from ringserve.errors import GenerationError
from ringserve.ipc.bounds import MAX_BODY_NESTING, MAX_NESTING, BodyBounds
from ringserve.ipc.json_shape import json_shape
from ringserve.ipc.messages import ToolCall

BOUNDS = BodyBounds(context_limit=1000, max_bytes=1 << 24)
HELLO = [{"role": "user", "content": "hi"}]


def counted(value: Any) -> tuple[int, int, int]:
    """What json_shape counts, from the parsed value: values (a container and its items, as
    its opening and its commas count them), containers, depth."""
    if isinstance(value, dict | list):
        children = list(value.values()) if isinstance(value, dict) else value
        inside = [counted(child) for child in children]
        values = 1 + max(len(children) - 1, 0) + sum(v for v, _, _ in inside)
        containers = 1 + sum(c for _, c, _ in inside)
        return values, containers, 1 + max((d for _, _, d in inside), default=0)
    return 0, 0, 0


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 6 or roll < 0.3:
        return rng.choice([1, -2.5e3, None, True, "", 'a,[{"\\', "}]\\\\\\", "\u00e9\U0001f600"])
    if roll < 0.65:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f'k{i},["{{': random_json(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_the_shape_of_json_text_is_read_off_its_bytes_as_a_parser_sees_it() -> None:
    rng = random.Random(7)
    for _ in range(500):
        value = random_json(rng)
        for text in (json.dumps(value), json.dumps(value, indent=1, ensure_ascii=False)):
            shape = json_shape(text.encode())
            assert (shape.values, shape.containers, shape.depth) == counted(value), text


def test_a_long_text_is_weighed_across_its_chunks() -> None:
    value = ["x" * 5_000_000, [[1, '"]]]']] * 150_000, "\\" * 3]
    shape = json_shape(json.dumps(value).encode())  # many times the bytes of one pass
    assert (shape.values, shape.containers, shape.depth) == counted(value)


def refusal(raw: bytes, model: type[RequestBody] = ChatCompletionBody) -> GenerationError:
    with pytest.raises(GenerationError) as caught:
        parse_body(raw, model, BOUNDS)
    assert caught.value.status == 400
    return caught.value


def test_a_body_with_more_json_values_than_the_context_can_need_is_refused() -> None:
    def body(items: int) -> bytes:
        return json.dumps({"messages": HELLO, "x": [0] * items}).encode()

    room = BOUNDS.max_values - json_shape(body(1)).values  # each item more is one value more
    assert parse_body(body(1 + room), ChatCompletionBody, BOUNDS).messages[0].text() == "hi"
    assert "JSON values" in str(refusal(body(2 + room)))


def test_a_body_with_more_objects_and_arrays_than_the_context_can_need_is_refused() -> None:
    def body(arrays: int) -> bytes:
        return json.dumps({"messages": HELLO, "x": [[]] * arrays}).encode()

    room = BOUNDS.max_containers - json_shape(body(0)).containers
    assert parse_body(body(room), ChatCompletionBody, BOUNDS).messages[0].text() == "hi"
    assert "JSON objects and arrays" in str(refusal(body(room + 1)))


def test_a_body_nested_deeper_than_its_schemas_may_be_is_refused() -> None:
    deep = "[" * (MAX_BODY_NESTING + 1) + "]" * (MAX_BODY_NESTING + 1)
    error = refusal(f'{{"messages": [], "x": {deep}}}'.encode())
    assert f"more than {MAX_BODY_NESTING} levels" in str(error)


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatCompletionBody, {"messages": HELLO * 1001}, "messages"),
        (
            ChatCompletionBody,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1000}]},
            "messages",
        ),
        (
            MessagesBody,
            {
                "max_tokens": 1,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "text", "text": "a"}] * 500,
                            }
                        ]
                        * 2,
                    }
                ],
            },
            "messages",
        ),
        (
            MessagesBody,
            {"max_tokens": 1, "messages": HELLO, "system": [{"type": "text", "text": "a"}] * 1000},
            "messages",
        ),
        (ResponsesBody, {"input": [{"role": "user", "content": "a"}] * 1001}, "input"),
        (
            ResponsesBody,
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_text", "text": "a"}] * 1000,
                    }
                ]
            },
            "input",
        ),
        (CompletionBody, {"prompt": [7] * 1000}, "prompt"),
        (CompletionBody, {"prompt": [[7], [7] * 1000]}, "prompt"),
        (CompletionBody, {"prompt": ["a"] * 17}, "prompt"),
    ],
)
def test_a_conversation_longer_than_the_context_is_refused_before_validation(
    model: type[RequestBody], body: dict[str, Any], param: str
) -> None:
    error = refusal(json.dumps(body).encode(), model)
    assert error.param == param
    assert str(BOUNDS.context_limit) in str(error) or "16" in str(error)


def test_a_conversation_that_fits_is_read() -> None:
    read = parse_body(json.dumps({"messages": HELLO * 999}).encode(), ChatCompletionBody, BOUNDS)
    assert len(read.messages) == 999
    ids = parse_body(json.dumps({"prompt": [7] * 999}).encode(), CompletionBody, BOUNDS)
    assert ids.prompts == [tuple([7] * 999)]


@pytest.mark.parametrize(
    ("raw", "fragment", "param"),
    [
        (b'{"messages": [', "not valid JSON", None),
        (b'{"messages": "\xff"}', "not valid JSON", None),
        (
            b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
            "surrogate",
            "messages[0].content",
        ),
        (b"[1, 2]", "valid dictionary", None),
    ],
)
def test_what_is_not_a_valid_body_is_a_400_naming_why(
    raw: bytes, fragment: str, param: str | None
) -> None:
    error = refusal(raw)
    assert fragment in str(error)
    assert error.param == param


def test_a_surrogate_pair_is_text_and_an_escaped_backslash_is_no_surrogate() -> None:
    raw = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}]}'
    assert parse_body(raw, ChatCompletionBody, BOUNDS).messages[0].text() == "\U0001f600 \\ud800"


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"anyOf": [schema]}  # two JSON levels each: an object, then a list
    return schema


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (
            ChatCompletionBody,
            lambda s: {
                "messages": HELLO,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": s},
                },
            },
            "response_format.json_schema.schema",
        ),
        (
            ChatCompletionBody,
            lambda s: {
                "messages": HELLO,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": s}}],
            },
            "tools[0].function.parameters",
        ),
        (
            MessagesBody,
            lambda s: {
                "max_tokens": 1,
                "messages": HELLO,
                "tools": [{"name": "f", "input_schema": s}],
            },
            "tools[0].input_schema",
        ),
        (
            MessagesBody,
            lambda s: {
                "max_tokens": 1,
                "messages": HELLO,
                "output_config": {"format": {"type": "json_schema", "schema": s}},
            },
            "output_config.format.schema",
        ),
        (
            ResponsesBody,
            lambda s: {
                "input": "hi",
                "tools": [{"type": "function", "name": "f", "parameters": s}],
            },
            "tools[0].parameters",
        ),
        (
            ResponsesBody,
            lambda s: {
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": s}},
            },
            "text.format.schema",
        ),
    ],
)
def test_every_schema_is_held_to_the_same_nesting(
    model: type[RequestBody], body: Any, param: str
) -> None:
    fits = nested((MAX_NESTING + 1) // 2)
    model.model_validate(body(fits))
    error = refusal(json.dumps(body(nested(MAX_NESTING // 2 + 2))).encode(), model)
    assert error.param == param
    assert f"more than {MAX_NESTING} levels" in str(error)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "more than 64 levels"),
        (json.dumps({"a": [[]] * 70_000}), "JSON values"),
        ("[1]", "JSON object"),
    ],
)
def test_a_calls_arguments_are_weighed_before_they_are_parsed(
    arguments: str, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        ToolCall(id="c", name="f", arguments=arguments)


def stored(scope: str) -> StoredResponse:
    return StoredResponse(scope=scope, conversation=(), body={})


def test_a_key_keeps_its_own_stored_responses_whatever_another_stores() -> None:
    store = ResponseStore(per_key=3, total=4)
    for i in range(2):
        store.put(f"a{i}", stored("a"))
    for i in range(10):
        store.put(f"b{i}", stored("b"))
    assert [store.get(f"a{i}", "a") is not None for i in range(2)] == [True, True]
    kept = [i for i in range(10) if _kept(store, f"b{i}", "b")]
    assert kept == [8, 9]  # its own oldest went, down to an equal share of the four
    store.put("c0", stored("c"))
    assert sum(_kept(store, f"a{i}", "a") for i in range(2)) >= 1
    assert _kept(store, "c0", "c") and not _kept(store, "c0", "a")


def test_one_key_alone_keeps_up_to_its_own_bound() -> None:
    store = ResponseStore(per_key=3, total=10)
    for i in range(5):
        store.put(f"a{i}", stored("a"))
    assert [_kept(store, f"a{i}", "a") for i in range(5)] == [False, False, True, True, True]
    store.delete("a4", "a")
    assert not _kept(store, "a4", "a")


def _kept(store: ResponseStore, response_id: str, scope: str) -> bool:
    try:
        store.get(response_id, scope)
    except GenerationError:
        return False
    return True


def test_a_salt_gives_a_key_scopes_of_its_own() -> None:
    key = cache_scope(b"key")
    assert salted_scope(key, None) == key
    salted = {salted_scope(key, salt) for salt in ("one", "two")}
    assert len(salted) == 2 and key not in salted
    assert salted_scope(cache_scope(b"other"), "one") not in salted


def completion(**fields: Any) -> CompletionBody:
    raw = json.dumps({"prompt": "The ring", **fields}).encode()
    return parse_body(raw, CompletionBody, BOUNDS)


def test_an_echoed_prompt_may_be_scored_and_asked_for_no_tokens() -> None:
    (request,) = completion(echo=True, logprobs=2, max_tokens=0).to_requests(None, "")
    assert request.echo and request.sampling.logprobs == 2 and request.sampling.max_tokens == 0
    assert completion(echo=True, logprobs=0).to_requests(None, "")[0].sampling.logprobs == 0
    error = refusal(json.dumps({"prompt": "The ring", "max_tokens": 0}).encode(), CompletionBody)
    assert "only with echo" in str(error) and error.param == "max_tokens"
    chat = {"messages": HELLO, "max_tokens": 0}
    assert refusal(json.dumps(chat).encode()).param == "max_tokens"
