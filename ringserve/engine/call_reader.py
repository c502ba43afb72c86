"""One tool call written as JSON (`{"name": ..., "arguments": {...}}`, the format of mlx-lm's
`json_tools` parser), read as the model writes it: its name as soon as the head is written, then
its arguments' JSON text piece by piece, up to the brace that closes them."""

from __future__ import annotations

import json
import re
from typing import Any

# mlx-lm's parser of calls written as JSON between markers: the format we can enforce, and the
# one whose arguments stream as they are written.
JSON_TOOLS = "json_tools"
# A call's head, up to the first character of its arguments (an object): the name first.
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')
# A head is looked for in so many characters of a call at most (a call whose head is not there
# goes out when it ends).
HEAD_LIMIT = 4096


def writes_json_calls(parser: Any) -> bool:
    """Whether `parser` (a tokenizer's tool parser) is mlx-lm's JSON one."""
    return bool(getattr(parser, "__module__", "").rsplit(".", 1)[-1] == JSON_TOOLS)


class CallReader:
    """Feed it a call's text as it comes; `name` is known once the head is written, and each
    feed returns the arguments' text that it completed."""

    def __init__(self) -> None:
        self.text = ""  # the call so far
        self.name: str | None = None
        self.start = 0  # where the arguments begin in `text` (once the name is known)
        self.end: int | None = None  # one past their closing brace
        self._scanned = 0  # how far the arguments were read
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> str:
        self.text += text
        if self.name is None:
            head = HEAD.match(self.text, 0, HEAD_LIMIT)
            if head is None:
                return ""
            self.name = json.loads(head.group(1))
            self.start = self._scanned = head.end()
        if self.end is not None:
            return ""
        before = self._scanned
        self._scan()
        return self.text[before : self.end if self.end is not None else self._scanned]

    @property
    def arguments(self) -> str | None:
        """The arguments' text, once their closing brace is written."""
        return None if self.end is None else self.text[self.start : self.end]

    def _scan(self) -> None:
        """Reads on to the end of the text or to the brace that closes the arguments (only the
        nesting is followed: whether the text is JSON is judged when the call ends)."""
        for at in range(self._scanned, len(self.text)):
            char = self.text[at]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.end = self._scanned = at + 1
                    return
        self._scanned = len(self.text)
