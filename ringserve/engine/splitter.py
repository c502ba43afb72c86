"""An answer's text parted as the client reads it: content, reasoning (between the model's think
markers) and tool calls (between its tool-call markers). Markers never reach the client, also
when one arrives split across several pieces of text: text that may be the start of a marker is
held back.

A call written as JSON (mlx-lm's `json_tools` format) goes out as it is written: its id and name
once its head is written, then its arguments' text piece by piece; when it ends, mlx-lm's parser
checks it, and its last piece says whether it is whole. A call in another format goes out when
it ends, parsed by mlx-lm's parser for the model's format. Cut by the token limit, an answer
gives out no markup and no half call that had not begun to go out.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.engine.call_reader import CallReader, writes_json_calls
from ringserve.engine.stops import partial_match_length
from ringserve.ipc.messages import ToolCallPiece

log = logging.getLogger(__name__)

ToolParser = Callable[[str, Any], Any]


@dataclass
class Parts:
    content: str = ""
    reasoning: str = ""
    calls: list[ToolCallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def add(self, other: Parts) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        for piece in other.calls:
            self.add_piece(piece)

    def add_piece(self, piece: ToolCallPiece) -> None:
        """A call's next piece; what continues the call's last piece joins it (a piece that
        names a call stays one of its own, as OpenAI's first piece of a call is)."""
        last = self.calls[-1] if self.calls else None
        if last is None or last.index != piece.index or last.whole or piece.id is not None:
            self.calls.append(piece)
        elif last.id is None:
            joined = {"arguments": last.arguments + piece.arguments, "whole": piece.whole}
            self.calls[-1] = last.model_copy(update=joined)
        elif piece.arguments or piece.whole:
            self.calls.append(piece)


class Mode(Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL = "tool"


@dataclass(frozen=True)
class Markers:
    """The model's markers, as text; None where it has no such format (or none is wanted)."""

    think: tuple[str, str] | None = None
    tool: tuple[str, str] | None = None


def model_markers(tokenizer: TokenizerWrapper) -> Markers:
    """The think and tool-call markers mlx-lm found for this tokenizer."""
    think = tool = None
    if tokenizer.has_thinking and tokenizer.think_start and tokenizer.think_end:
        think = (str(tokenizer.think_start), str(tokenizer.think_end))
    if tokenizer.has_tool_calling and tokenizer.tool_call_start:
        # Some formats have no end marker: their calls run to the end of the answer.
        tool = (str(tokenizer.tool_call_start), str(tokenizer.tool_call_end or ""))
    return Markers(think, tool)


class AnswerSplitter:
    def __init__(
        self,
        markers: Markers,
        thinking: bool = False,
        parse: ToolParser | None = None,
        tools: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.markers = markers
        self.mode = Mode.REASONING if thinking and markers.think else Mode.CONTENT
        self.parse = parse
        self.tools = list(tools)
        self.streams_calls = writes_json_calls(parse)
        self.held = ""  # text not yet routed: it may begin a marker (or end a think block)
        self.call = CallReader()  # the current tool call so far
        self.call_index: int | None = None  # the current call's index, once it went out
        self.trim = self.mode is Mode.REASONING  # newlines after a marker are the format's
        self.calls_made = 0
        self.content_started = False  # a think block opens only at the start of the answer

    def feed(self, text: str) -> list[Parts]:
        """What `text` completes, in the answer's order: a new part begins where a call ends."""
        out = [Parts()]
        self.held += text
        while self.held:
            if self.trim:
                self.held = self.held.lstrip("\n")
                if not self.held:
                    break
                self.trim = False
            closing = self._closing()
            found = [(self.held.find(m), m, mode) for m, mode in closing]
            found = [(i, m, mode) for i, m, mode in found if i >= 0]
            if found:
                i, marker, mode = min(found, key=lambda f: f[0])
                before = self.held[:i]
                self._route(before.rstrip("\n") if self.mode is Mode.REASONING else before, out[-1])
                self.held = self.held[i + len(marker) :]
                if self._switch(mode, out[-1]):
                    out.append(Parts())
                continue
            keep = partial_match_length(self.held, [m for m, _ in closing])
            if self.mode is Mode.REASONING:  # newlines before the end marker are the format's
                rest = self.held[: len(self.held) - keep]
                keep += len(rest) - len(rest.rstrip("\n"))
            self._route(self.held[: len(self.held) - keep], out[-1])
            self.held = self.held[len(self.held) - keep :]
            break
        return [parts for parts in out if parts]

    def finish(self, cut: bool = False) -> Parts:
        """The end of the answer: what was held back goes out as it is; an unfinished call is
        parsed if it can be, else given back as content. `cut`: the answer ended at its token
        limit, where what was held back (the start of a marker) and an unfinished call that
        does not parse are markup the model could not finish: they are dropped."""
        out = Parts()
        if not cut or self.mode is Mode.REASONING:
            self._route(self.held, out)
        self.held = ""
        if self.mode is Mode.TOOL:
            self._end_call(out, finished=False, cut=cut)
        return out

    def _closing(self) -> list[tuple[str, Mode]]:
        """The markers that end the current mode, and the mode each leads to."""
        think, tool = self.markers.think, self.markers.tool
        if self.mode is Mode.REASONING and think:
            return [(think[1], Mode.CONTENT)]
        if self.mode is Mode.TOOL and tool:
            return [(tool[1], Mode.CONTENT)] if tool[1] else []
        found = []
        if think and not self.content_started:
            found.append((think[0], Mode.REASONING))
        if tool and self.parse is not None and self.tools:
            found.append((tool[0], Mode.TOOL))
        return found

    def _route(self, text: str, out: Parts) -> None:
        if not text:
            return
        if self.mode is Mode.REASONING:
            out.reasoning += text
        elif self.mode is Mode.TOOL:
            self._grow_call(text, out)
        else:
            out.content += text
            self.content_started = self.content_started or bool(text.strip())

    def _switch(self, mode: Mode, out: Parts) -> bool:
        """Into `mode`; whether a call ended."""
        ended = self.mode is Mode.TOOL
        if ended:
            self._end_call(out, finished=True)
        self.mode = mode
        self.trim = True
        return ended

    def _grow_call(self, text: str, out: Parts) -> None:
        """More of the current call: once its head names it, it goes out as it is written."""
        if not self.streams_calls:
            self.call.text += text
            return
        arguments = self.call.feed(text)
        if self.call_index is None and self.call.name is not None:
            self.call_index = self._next_index()
            call_id = f"call_{secrets.token_hex(12)}"
            out.add_piece(ToolCallPiece(index=self.call_index, id=call_id, name=self.call.name))
        if arguments and self.call_index is not None:
            out.add_piece(ToolCallPiece(index=self.call_index, arguments=arguments))

    def _next_index(self) -> int:
        self.calls_made += 1
        return self.calls_made - 1

    def _end_call(self, out: Parts, finished: bool, cut: bool = False) -> None:
        call, self.call = self.call, CallReader()
        index, self.call_index = self.call_index, None
        if index is not None:
            if self._went_out_whole(call):
                out.add_piece(ToolCallPiece(index=index, whole=True))
            return
        assert self.parse is not None and self.markers.tool is not None
        try:
            parsed = self.parse(call.text, self.tools)
            calls = [_called(c) for c in (parsed if isinstance(parsed, list) else [parsed])]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if cut:
                log.info("a tool call cut by the token limit is left out")
                return
            log.warning("a tool call did not parse (%s): given back as content", exc)
            start, end = self.markers.tool
            out.content += start + call.text + (end if finished else "")
            return
        for call_id, name, arguments in calls:
            index = self._next_index()
            out.add_piece(ToolCallPiece(index=index, id=call_id, name=name))
            out.add_piece(ToolCallPiece(index=index, arguments=arguments, whole=True))

    def _went_out_whole(self, call: CallReader) -> bool:
        """Whether a call that went out as it was written is one whole call: its arguments a
        JSON object, as mlx-lm's parser reads the call."""
        assert self.parse is not None
        try:
            parsed = self.parse(call.text, self.tools)
            arguments = json.loads(call.arguments or "")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("a tool call that went out did not end whole: %s", exc)
            return False
        if not isinstance(parsed, dict) or not isinstance(arguments, dict):
            log.warning("a tool call that went out is no call of a function with arguments")
            return False
        if parsed.get("name") != call.name or parsed.get("arguments") != arguments:
            log.warning("a tool call that went out reads otherwise whole: %r", call.text[:80])
            return False
        return True


def _called(call: Any) -> tuple[str, str, str]:
    """A parsed call's id, name and arguments (JSON text); ValueError for what is no call of a
    function."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"not a call of a named function: {call!r:.80}")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments that are no JSON object: {arguments!r:.80}")
    call_id = str(call.get("id") or f"call_{secrets.token_hex(12)}")
    return call_id, call["name"], json.dumps(arguments, ensure_ascii=False)
