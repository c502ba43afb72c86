"""How much a JSON text holds and how deep it nests, read off its bytes without parsing it.

Python's JSON parsers hold the interpreter for as long as they run, in whatever thread: a
parse of millions of small values stalls every other thread of the process for seconds. This
count runs on numpy's arrays, a few passes over the bytes that leave the interpreter free, so
a text can be weighed against its bounds before it is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bytes looked at per pass: the temporary arrays stay a few times this size.
_CHUNK = 1 << 22
_QUOTE, _COMMA = ord('"'), ord(",")
_OPENS, _CLOSES = (ord("["), ord("{")), (ord("]"), ord("}"))


@dataclass(frozen=True)
class JsonShape:
    values: int  # objects and arrays, and the items and members in them
    containers: int  # objects and arrays (each costs a parser several times what a number does)
    depth: int  # levels of objects and arrays


def json_shape(text: bytes) -> JsonShape:
    """The shape of `text`, exact for valid JSON (and for the valid start of a text a parser
    would stop reading at its first error).

    Inside strings nothing counts: with escaped backslashes and escaped quotes removed (JSON
    escapes are a backslash and one more character), every quote left opens or closes a string.
    """
    plain = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    values = containers = depth = level = inside = 0
    for start in range(0, len(plain), _CHUNK):
        chunk = np.frombuffer(plain, np.uint8, min(_CHUNK, len(plain) - start), start)
        # Quotes so far, odd inside a string (a uint8 sum wraps at 256, keeping the parity).
        quotes = np.cumsum(chunk == _QUOTE, dtype=np.uint8)
        outside = ((quotes + inside) & 1) == 0
        inside = (int(quotes[-1]) + inside) & 1
        opens = ((chunk == _OPENS[0]) | (chunk == _OPENS[1])) & outside
        closes = ((chunk == _CLOSES[0]) | (chunk == _CLOSES[1])) & outside
        opened = int(np.count_nonzero(opens))
        containers += opened
        values += opened + int(np.count_nonzero((chunk == _COMMA) & outside))
        levels = np.cumsum(opens.astype(np.int32) - closes, dtype=np.int32) + level
        depth = max(depth, int(levels.max()))
        level = int(levels[-1])
    return JsonShape(values, containers, depth)
