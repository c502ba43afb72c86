"""An answer's text parted into content, reasoning and tool calls, with mlx-lm's own parsers,
on outputs written the way real model families write them, fed whole and in small pieces."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from mlx_lm.tool_parsers import json_tools, mistral, pythonic

from ringserve.api.calls import Call, Calls
from ringserve.engine.splitter import AnswerSplitter, Markers, Parts

QWEN = Markers(think=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"))
MISTRAL = Markers(tool=("[TOOL_CALLS]", ""))
LFM = Markers(tool=("<|tool_call_start|>", "<|tool_call_end|>"))
WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def split(splitter: AnswerSplitter, pieces: Iterable[str], cut: bool = False) -> Parts:
    out = Parts()
    for piece in pieces:
        for parts in splitter.feed(piece):
            out.add(parts)
    out.add(splitter.finish(cut))
    return out


def assembled(parts: Parts) -> list[Call]:
    """The calls, as a client puts them together from their pieces."""
    calls = Calls()
    for piece in parts.calls:
        calls.add(piece)
    return list(calls.by_index.values())


def in_pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def calls(parts: Parts) -> list[tuple[str, dict[str, Any]]]:
    whole = assembled(parts)
    assert all(call.whole for call in whole)
    return [(c.name, json.loads(c.arguments)) for c in whole]


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
    assert [c.index for c in assembled(parts)] == [0, 1]
    assert len({c.id for c in assembled(parts)}) == 2


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


def pieces_fed(splitter: AnswerSplitter, text: str, size: int) -> list[list[Parts]]:
    """What each feed of `text`, `size` characters at a time, gave out."""
    return [splitter.feed(piece) for piece in in_pieces(text, size)]


LONG_CALL = (
    '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo",  "note": "a [long] '
    'note with \\"quotes\\" and {braces}", "days": [1, 2]}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_a_json_call_goes_out_as_it_is_written(size: int) -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    fed = pieces_fed(splitter, LONG_CALL, size)
    assert splitter.finish() == Parts()
    pieces = [piece for parts in fed for p in parts for piece in p.calls]
    head, *rest = pieces
    assert (head.index, head.name, head.arguments, head.whole) == (0, "weather", "", False)
    assert head.id is not None and head.id.startswith("call_")
    assert all(p.id is None and p.name is None and p.index == 0 for p in rest)
    assert [p.whole for p in rest] == [False] * (len(rest) - 1) + [True]
    fragments = [p.arguments for p in rest if p.arguments]
    assert len(fragments) > 3  # one or two per feed, as the model writes them
    # Exactly the text the model wrote, from the brace that opens the arguments to the one that
    # closes them: it is one JSON object.
    written = LONG_CALL[LONG_CALL.index('{"city"') : LONG_CALL.rindex("}}") + 1]
    assert "".join(fragments) == written
    assert json.loads(written)["note"] == 'a [long] note with "quotes" and {braces}'
    # The head goes out as soon as the arguments begin: before the first of them is read whole.
    went_out_at = next(i for i, parts in enumerate(fed) if parts and parts[0].calls)
    assert went_out_at * size <= LONG_CALL.index('{"city"')


def test_content_after_a_call_in_the_same_text_comes_after_it() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    text = 'Sure.\n<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>\nDone.'
    first, second = splitter.feed(text)
    assert first.content == "Sure.\n" and [p.name for p in first.calls if p.name] == ["weather"]
    assert first.calls[-1].whole
    assert second == Parts(content="Done.")


def test_a_call_whose_arguments_are_no_json_does_not_end_whole() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    parts = split(
        splitter, ['<tool_call>\n{"name": "weather", "arguments": {city: Oslo}}\n</tool_call>']
    )
    [call] = assembled(parts)
    assert (call.name, call.arguments, call.whole) == ("weather", "{city: Oslo}", False)
    assert parts.content == ""


@pytest.mark.parametrize(
    "written",
    [
        "Let me check. <tool_",
        'Let me check. <tool_call>\n{"name":',
        'Let me check. <tool_call>\n{"name": "weather", "argu',
    ],
)
def test_a_call_cut_by_the_token_limit_leaves_no_markup(written: str) -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    assert split(splitter, in_pieces(written, 4), cut=True) == Parts(content="Let me check. ")


def test_a_call_cut_while_its_arguments_go_out_never_ends_whole() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    written = '<tool_call>\n{"name": "weather", "arguments": {"city": "Os'
    parts = split(splitter, in_pieces(written, 5), cut=True)
    [call] = assembled(parts)
    assert (call.arguments, call.whole, parts.content) == ('{"city": "Os', False, "")


def test_a_call_whose_end_marker_the_limit_cut_off_is_whole() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    written = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool'
    assert calls(split(splitter, [written], cut=True)) == [("weather", {"city": "Oslo"})]


def test_an_unfinished_call_at_the_end_of_an_answer_is_given_back_as_content() -> None:
    splitter = AnswerSplitter(QWEN, parse=json_tools.parse_tool_call, tools=WEATHER)
    written = '<tool_call>\n{"name": "weath'
    assert split(splitter, [written]) == Parts(content='<tool_call>{"name": "weath')
