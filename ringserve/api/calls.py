"""An answer's tool calls, put together from the pieces rank 0 sends as the model writes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringserve.ipc.messages import ToolCallPiece


@dataclass
class Call:
    index: int  # its place among the answer's calls
    id: str
    name: str
    arguments: str = ""  # JSON text, as much as was written
    whole: bool = False  # its arguments are one whole JSON object (not cut short)

    def openai(self) -> dict[str, Any]:
        """As OpenAI's chat completions write a call."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


class Calls:
    """One answer's calls, by index."""

    def __init__(self) -> None:
        self.by_index: dict[int, Call] = {}

    def add(self, piece: ToolCallPiece) -> Call:
        """The call `piece` begins or goes on with, as it stands now."""
        if piece.id is not None:
            self.by_index[piece.index] = Call(piece.index, piece.id, piece.name or "")
        call = self.by_index[piece.index]
        call.arguments += piece.arguments
        call.whole = call.whole or piece.whole
        return call

    def whole(self) -> list[Call]:
        """The calls a whole answer holds: a call cut short has no place there."""
        return [call for call in self.by_index.values() if call.whole]


def openai_piece(piece: ToolCallPiece) -> dict[str, Any] | None:
    """A piece as OpenAI's streamed chat completions write it: the first with the call's id,
    type and name (and no arguments yet), the next ones with their arguments only. None for a
    piece that only says its call is whole."""
    if piece.id is not None:
        function = {"name": piece.name or "", "arguments": piece.arguments}
        return {"index": piece.index, "id": piece.id, "type": "function", "function": function}
    if not piece.arguments:
        return None
    return {"index": piece.index, "function": {"arguments": piece.arguments}}
