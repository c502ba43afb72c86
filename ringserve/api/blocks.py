"""An answer as ordered blocks: its thinking, its text and each tool call, one after another.

The Anthropic Messages and OpenAI Responses APIs both give an answer as a list of such blocks
(content blocks; output items), streamed as start, deltas and stop. Rank 0's deltas carry
thinking, text and parsed calls side by side; this turns them into that sequence, once for
both APIs, streamed or whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ringserve.ipc.messages import CalledTool, Delta

BlockKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    index: int  # its place in the answer
    kind: BlockKind
    text: str = ""  # the thinking, the text, or the call's arguments (JSON text)
    call: CalledTool | None = None  # a tool call's name and id


@dataclass(frozen=True)
class BlockEvent:
    kind: Literal["start", "delta", "stop"]
    block: Block
    text: str = ""  # a delta's text


class Blocks:
    """Feed it every delta, then `finish`; each returns the events that happened."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._open: Block | None = None

    def feed(self, delta: Delta) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        for kind, text in (("reasoning", delta.reasoning), ("text", delta.text)):
            if text:
                events += self._add(kind, text)  # type: ignore[arg-type]
        for call in delta.tool_calls:
            events += self._close()
            block = self._begin("tool_call", call)
            events += [BlockEvent("start", block), *self._grow(block, call.arguments)]
            events += self._close()
        return events

    def finish(self) -> list[BlockEvent]:
        return self._close()

    def _add(self, kind: BlockKind, text: str) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if self._open is None or self._open.kind != kind:
            events += self._close()
            events.append(BlockEvent("start", self._begin(kind)))
        assert self._open is not None
        return events + self._grow(self._open, text)

    def _begin(self, kind: BlockKind, call: CalledTool | None = None) -> Block:
        block = Block(len(self.blocks), kind, call=call)
        self.blocks.append(block)
        self._open = block
        return block

    @staticmethod
    def _grow(block: Block, text: str) -> list[BlockEvent]:
        block.text += text
        return [BlockEvent("delta", block, text)]

    def _close(self) -> list[BlockEvent]:
        if self._open is None:
            return []
        block, self._open = self._open, None
        return [BlockEvent("stop", block)]
