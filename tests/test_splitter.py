"""An answer's text parted into content, reasoning and tool calls, with mlx-lm's own parsers,
on outputs written the way real model families write them, fed whole and in small pieces."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from mlx_lm.tool_parsers import json_tools, mistral, pythonic

from ringserve.engine.splitter import AnswerSplitter, Markers, Parts

QWEN = Markers(think=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"))
MISTRAL = Markers(tool=("[TOOL_CALLS]", ""))
LFM = Markers(tool=("<|tool_call_start|>", "<|tool_call_end|>"))
WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def split(splitter: AnswerSplitter, pieces: Iterable[str]) -> Parts:
    out = Parts()
    for piece in pieces:
        out.add(splitter.feed(piece))
    out.add(splitter.finish())
    return out


def in_pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def calls(parts: Parts) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in parts.calls]


QWEN3_ANSWER = (
    "<think>\nThe user wants the weather in two cities.\n</think>\n\n"
    "Let me check.\n"
    '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [len(QWEN3_ANSWER), 1, 2, 3, 7])
def test_qwen3_thinking_content_and_parallel_calls_whatever_the_pieces(size: int) -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    parts = split(splitter, in_pieces(QWEN3_ANSWER, size))
    assert parts.reasoning == "The user wants the weather in two cities."
    assert parts.content == "Let me check.\n"  # newlines after a marker are the format's
    oslo, paris = ("weather", {"city": "Oslo"}), ("weather", {"city": "Paris", "days": 3})
    assert calls(parts) == [oslo, paris]
    assert [c.index for c in parts.calls] == [0, 1]
    assert len({c.id for c in parts.calls}) == 2


def test_an_answer_that_starts_inside_the_think_block() -> None:
    splitter = AnswerSplitter(QWEN, thinking=True)
    parts = split(splitter, ["\nhmm, let", " me see</th", "ink>\n\nThe answer is 4."])
    assert (parts.reasoning, parts.content) == ("hmm, let me see", "The answer is 4.")


def test_thinking_cut_short_stays_reasoning_and_a_lone_marker_start_is_text() -> None:
    splitter = AnswerSplitter(QWEN, thinking=True)
    assert split(splitter, ["still thinking <", "/thi"]) == Parts(reasoning="still thinking </thi")
    plain = AnswerSplitter(QWEN)
    assert split(plain, ["a < b and <tool", "s"]) == Parts(content="a < b and <tools")


def test_tool_markers_without_tools_offered_are_content() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=())
    text = '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>'
    assert split(splitter, [text]) == Parts(content=text)


def test_a_call_that_does_not_parse_is_given_back_as_content() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    parts = split(splitter, ["<tool_call>\n{not json\n</tool_call> after"])
    assert parts.calls == []
    assert parts.content.startswith("<tool_call>{not json") and parts.content.endswith(" after")


def test_mistral_calls_run_to_the_end_of_the_answer() -> None:
    answer = 'Sure. [TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}]'
    splitter = AnswerSplitter(MISTRAL, parse=mistral.parse_tool_call, tools=WEATHER)
    parts = split(splitter, in_pieces(answer, 5))
    assert parts.content == "Sure. "
    assert calls(parts) == [("weather", {"city": "Oslo"})]


def test_pythonic_calls_between_lfm_markers() -> None:
    answer = '<|tool_call_start|>[weather(city="Oslo", days=2)]<|tool_call_end|>Done.'
    splitter = AnswerSplitter(LFM, parse=pythonic.parse_tool_call, tools=WEATHER)
    parts = split(splitter, in_pieces(answer, 4))
    assert calls(parts) == [("weather", {"city": "Oslo", "days": 2})]
    assert parts.content == "Done."
