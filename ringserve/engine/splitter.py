"""An answer's text parted as the client reads it: content, reasoning (between the model's think
markers) and tool calls (between its tool-call markers, parsed by mlx-lm's parser for the
model's format when a call ends). Markers never reach the client, also when one arrives split
across several pieces of text: text that may be the start of a marker is held back.
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

from ringserve.engine.stops import partial_match_length
from ringserve.ipc.messages import CalledTool

log = logging.getLogger(__name__)

ToolParser = Callable[[str, Any], Any]


@dataclass
class Parts:
    content: str = ""
    reasoning: str = ""
    calls: list[CalledTool] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def add(self, other: Parts) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls += other.calls


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
        self.held = ""  # text not yet routed: it may begin a marker (or end a think block)
        self.call_text = ""  # the current tool call's text so far
        self.trim = self.mode is Mode.REASONING  # newlines after a marker are the format's
        self.calls_made = 0
        self.content_started = False  # a think block opens only at the start of the answer

    def feed(self, text: str) -> Parts:
        out = Parts()
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
                self._route(before.rstrip("\n") if self.mode is Mode.REASONING else before, out)
                self.held = self.held[i + len(marker) :]
                self._switch(mode, out)
                continue
            keep = partial_match_length(self.held, [m for m, _ in closing])
            if self.mode is Mode.REASONING:  # newlines before the end marker are the format's
                rest = self.held[: len(self.held) - keep]
                keep += len(rest) - len(rest.rstrip("\n"))
            self._route(self.held[: len(self.held) - keep], out)
            self.held = self.held[len(self.held) - keep :]
            break
        return out

    def finish(self) -> Parts:
        """The end of the answer: what was held back goes out as it is; an unfinished call is
        parsed if it can be, else given back as content."""
        out = Parts()
        self._route(self.held, out)
        self.held = ""
        if self.mode is Mode.TOOL:
            self._end_call(out, finished=False)
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
            self.call_text += text
        else:
            out.content += text
            self.content_started = self.content_started or bool(text.strip())

    def _switch(self, mode: Mode, out: Parts) -> None:
        if self.mode is Mode.TOOL:
            self._end_call(out, finished=True)
        self.mode = mode
        self.trim = True

    def _end_call(self, out: Parts, finished: bool) -> None:
        text, self.call_text = self.call_text, ""
        assert self.parse is not None and self.markers.tool is not None
        try:
            parsed = self.parse(text, self.tools)
            calls = [
                _called(call, self.calls_made + i)
                for i, call in enumerate(parsed if isinstance(parsed, list) else [parsed])
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("a tool call did not parse (%s): given back as content", exc)
            start, end = self.markers.tool
            out.content += start + text + (end if finished else "")
            return
        out.calls += calls
        self.calls_made += len(calls)


def _called(call: Any, index: int) -> CalledTool:
    """A parsed call as the client gets it; ValueError for what is no call of a function."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"not a call of a named function: {call!r:.80}")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments that are no JSON object: {arguments!r:.80}")
    return CalledTool(
        index=index,
        id=str(call.get("id") or f"call_{secrets.token_hex(12)}"),
        name=call["name"],
        arguments=json.dumps(arguments, ensure_ascii=False),
    )
