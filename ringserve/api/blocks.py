"""An answer as ordered blocks: its thinking, its text and each tool call, one after another.

The Anthropic Messages and OpenAI Responses APIs both give an answer as a list of such blocks
(content blocks; output items), streamed as start, deltas and stop. Rank 0's deltas carry
thinking, text and the pieces of calls (in this order, within one delta); this turns them into
that sequence, once for both APIs, streamed or whole. A call's block starts with its first
piece and grows with its arguments as they are written; a call cut short (by the token limit)
ends unwhole, and has no place in a whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ringserve.api.calls import Call
from ringserve.ipc.messages import Delta, ToolCallPiece

BlockKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    index: int  # its place in the answer
    kind: BlockKind
    text: str = ""  # the thinking, the text, or the call's arguments (JSON text)
    call: Call | None = None  # a tool call's name and id

    @property
    def whole(self) -> bool:
        """Not a call cut short."""
        return self.call is None or self.call.whole


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
        self._calls: dict[int, Block] = {}  # each call's block, by the call's index

    def feed(self, delta: Delta) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        for kind, text in (("reasoning", delta.reasoning), ("text", delta.text)):
            if text:
                events += self._add(kind, text)  # type: ignore[arg-type]
        for piece in delta.tool_calls:
            events += self._piece(piece)
        return events

    def whole_blocks(self) -> list[Block]:
        """The blocks of a whole answer: every one but a call cut short."""
        return [block for block in self.blocks if block.whole]

    def finish(self) -> list[BlockEvent]:
        return self._close()

    def _piece(self, piece: ToolCallPiece) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if piece.id is not None:
            events += self._close()
            call = Call(piece.index, piece.id, piece.name or "")
            self._calls[piece.index] = self._begin("tool_call", call)
            events.append(BlockEvent("start", self._calls[piece.index]))
        block = self._calls[piece.index]
        assert block.call is not None
        if piece.arguments:
            events += self._grow(block, piece.arguments)
            block.call.arguments = block.text
        if piece.whole:
            block.call.whole = True
            if self._open is block:
                events += self._close()
        return events

    def _add(self, kind: BlockKind, text: str) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if self._open is None or self._open.kind != kind:
            events += self._close()
            events.append(BlockEvent("start", self._begin(kind)))
        assert self._open is not None
        return events + self._grow(self._open, text)

    def _begin(self, kind: BlockKind, call: Call | None = None) -> Block:
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
