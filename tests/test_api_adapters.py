"""The pieces the Anthropic and Responses front ends share with the chat endpoint: requests
onto chat turns, rank 0's deltas into ordered blocks; and what the API answers with no ranks
behind it (metrics, and errors in each API's own shape)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ringserve.api.anthropic_messages import MessagesBody
from ringserve.api.app import create_app
from ringserve.api.blocks import Blocks
from ringserve.api.calls import Call
from ringserve.api.openai_responses import InputItem, ResponsesBody, input_turns
from ringserve.api.responses import chat_deltas, opens_with_call
from ringserve.config.settings import Settings
from ringserve.ipc.messages import ChatTurn, Delta, ToolCall, ToolCallPiece


def test_deltas_become_thinking_then_text_then_each_call_as_it_is_written() -> None:
    blocks = Blocks()
    head = ToolCallPiece(index=0, id="call_1", name="f")
    cut = ToolCallPiece(index=1, id="call_2", name="g")
    events = [
        *blocks.feed(Delta(text="", tokens=1, reasoning="Hm")),
        *blocks.feed(Delta(text="", tokens=2, reasoning=", so")),
        *blocks.feed(Delta(text="Yes", tokens=3, reasoning="!")),
        *blocks.feed(Delta(text="", tokens=4, tool_calls=(head,))),
        *blocks.feed(Delta(text="", tokens=5, tool_calls=(piece(0, '{"a": '),))),
        *blocks.feed(Delta(text="", tokens=6, tool_calls=(piece(0, "1}", whole=True), cut))),
        *blocks.feed(Delta(text="", tokens=7, tool_calls=(piece(1, '{"b'),))),
        *blocks.finish(),
    ]
    assert [(e.kind, e.block.index, e.text) for e in events] == [
        ("start", 0, ""),
        ("delta", 0, "Hm"),
        ("delta", 0, ", so"),
        ("delta", 0, "!"),
        ("stop", 0, ""),
        ("start", 1, ""),
        ("delta", 1, "Yes"),
        ("stop", 1, ""),
        ("start", 2, ""),
        ("delta", 2, '{"a": '),
        ("delta", 2, "1}"),
        ("stop", 2, ""),
        ("start", 3, ""),
        ("delta", 3, '{"b'),
        ("stop", 3, ""),
    ]
    assert [(b.kind, b.text, b.whole) for b in blocks.blocks] == [
        ("reasoning", "Hm, so!", True),
        ("text", "Yes", True),
        ("tool_call", '{"a": 1}', True),
        ("tool_call", '{"b', False),
    ]
    assert blocks.blocks[2].call == Call(0, "call_1", "f", '{"a": 1}', whole=True)
    assert blocks.whole_blocks() == blocks.blocks[:3]  # the call cut short is left out


def piece(index: int, arguments: str, whole: bool = False) -> ToolCallPiece:
    return ToolCallPiece(index=index, arguments=arguments, whole=whole)


def test_chat_deltas_as_openai_streams_them() -> None:
    head = ToolCallPiece(index=0, id="call_1", name="f")
    opening = chat_deltas(Delta(text="", tokens=3, tool_calls=(head, piece(0, '{"a"'))))
    assert opens_with_call(opening)  # an answer that opens with a call has no content
    assert opening == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": ""},
                }
            ],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
    ]
    text = chat_deltas(Delta(text="Hi", tokens=1, tool_calls=(head,)))
    assert not opens_with_call(text)  # it opens with the role and empty content
    assert text[0] == {"content": "Hi"} and text[1]["tool_calls"][0]["id"] == "call_1"
    assert chat_deltas(Delta(text="", tokens=4, tool_calls=(piece(0, "", whole=True),))) == []


def test_response_items_gather_into_one_assistant_turn_per_answer() -> None:
    items = [
        InputItem.model_validate(item)
        for item in [
            {"role": "user", "content": "Hi"},
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "A"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]
    ]
    assert input_turns(items) == [
        ChatTurn(role="user", content="Hi"),
        ChatTurn(
            role="assistant",
            content="A",
            reasoning="think",
            tool_calls=(ToolCall(id="c1", name="f", arguments="{}"),),
        ),
        ChatTurn(role="tool", content="42", tool_call_id="c1"),
    ]


def test_anthropic_tool_results_come_before_the_users_text() -> None:
    body = MessagesBody.model_validate(
        {
            "max_tokens": 8,
            "system": [{"type": "text", "text": "Be kind."}],
            "messages": [
                {"role": "user", "content": "Time?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "ask", "signature": "s"},
                        {"type": "tool_use", "id": "t1", "name": "clock", "input": {"z": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "noon"},
                        {"type": "text", "text": "Thanks"},
                    ],
                },
            ],
        }
    )
    request = body.to_request(cache_scope="s")
    assert request.messages == (
        ChatTurn(role="system", content="Be kind."),
        ChatTurn(role="user", content="Time?"),
        ChatTurn(
            role="assistant",
            content="",
            reasoning="ask",
            tool_calls=(ToolCall(id="t1", name="clock", arguments='{"z": 1}'),),
        ),
        ChatTurn(role="tool", content="noon", tool_call_id="t1"),
        ChatTurn(role="user", content="Thanks"),
    )
    assert request.chat_template_kwargs == {"enable_thinking": False}  # thinking when asked
    assert request.max_tokens_ceiling  # Anthropic's max_tokens is a ceiling


def api_without_ranks(tmp_path: Path, **settings: object) -> TestClient:
    socket = tmp_path / "nobody.sock"
    app = create_app(Settings(api_key="k", socket_path=socket, **settings))  # type: ignore[arg-type]
    return TestClient(app)


def test_metrics_are_protected_unless_left_open(tmp_path: Path) -> None:
    assert api_without_ranks(tmp_path).get("/metrics").status_code == 401
    scraped = api_without_ranks(tmp_path, metrics_open=True).get("/metrics")
    assert scraped.status_code == 200
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    assert samples["ringserve_ready"] == 0  # no ranks answer: said, not an error


def test_errors_take_the_shape_of_the_api_asked(tmp_path: Path) -> None:
    api = api_without_ranks(tmp_path)
    anthropic_401 = api.post("/v1/messages", json={})
    assert anthropic_401.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid or missing API key"},
    }
    openai_401 = api.post("/v1/responses", json={})
    assert openai_401.json()["error"]["code"] == "invalid_api_key"
    body = {"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    not_serving = api.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert not_serving.status_code == 503
    assert not_serving.json()["error"]["type"] == "overloaded_error"


def test_system_messages_among_the_messages_as_claude_code_sends_them() -> None:
    body = MessagesBody.model_validate(
        {
            "max_tokens": 8,
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Tools: Agent, Bash."},
                {"role": "system", "content": "Once.", "clear_at": "next_user_message"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Go on"},
            ],
        }
    )
    assert body.to_request(cache_scope="s").messages == (
        ChatTurn(role="user", content="Hi"),
        ChatTurn(role="system", content="Tools: Agent, Bash."),
        ChatTurn(role="assistant", content="Hello"),
        ChatTurn(role="user", content="Go on"),
    )


def test_responses_offer_functions_and_namespaces_and_leave_hosted_tools_out() -> None:
    body = ResponsesBody.model_validate(
        {
            "input": "Hi",
            "tools": [
                {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
                {
                    "type": "namespace",
                    "name": "agents",
                    "tools": [{"type": "function", "name": "close_agent"}],
                },
                {"type": "web_search", "external_web_access": False},  # Codex sends it always
            ],
        }
    )
    assert [(space, tool.name) for space, tool in body.offered()] == [
        (None, "exec_command"),
        ("agents", "close_agent"),
    ]
    assert body.namespaces() == {"close_agent": "agents"}


def test_a_function_outputs_picture_is_named_not_refused() -> None:
    items = [
        InputItem.model_validate(item)
        for item in [
            {"type": "function_call", "call_id": "c1", "name": "view_image", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_image", "image_url": "data:image/png;base64,"}],
            },
        ]
    ]
    assert input_turns(items)[-1] == ChatTurn(
        role="tool",
        content="[input_image omitted: this server's model reads text only]",
        tool_call_id="c1",
    )
