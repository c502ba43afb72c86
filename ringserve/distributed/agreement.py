"""What the ranks settle together outside the engine's steps: each rank's numbers on every rank
(one all_sum per call, every rank contributing its own row and zeros elsewhere).

Every rank must make the same calls in the same order. Used at start (what each rank can hold,
which entries each found) and by the prefix cache when a rank may have failed to read its part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

T = TypeVar("T")


def gather_rows(
    group: mx.distributed.Group, row: Sequence[int], stream: Any = None
) -> list[list[int]]:
    """Every rank's `row` (the same length on every rank), on every rank, in rank order."""
    rows = np.zeros((group.size(), len(row)), dtype=np.int64)
    rows[group.rank()] = row
    if group.size() == 1:
        return [[int(n) for n in r] for r in rows]
    summed = mx.distributed.all_sum(mx.array(rows), group=group, stream=stream or mx.cpu)
    return [[int(n) for n in r] for r in np.array(summed, copy=False)]


def gather_lists(
    group: mx.distributed.Group, mine: Sequence[int], stream: Any = None
) -> list[list[int]]:
    """Every rank's list of numbers (of any length), on every rank: lengths first."""
    lengths = [row[0] for row in gather_rows(group, [len(mine)], stream)]
    if not any(lengths):
        return [[] for _ in lengths]
    padded = [*mine, *[0] * (max(lengths, default=0) - len(mine))]
    rows = gather_rows(group, padded, stream)
    return [row[:length] for row, length in zip(rows, lengths, strict=True)]


def all_agree(group: mx.distributed.Group, ok: bool, stream: Any = None) -> bool:
    """Whether every rank passed True."""
    return sum(row[0] for row in gather_rows(group, [0 if ok else 1], stream)) == 0


def held_by_all(collections: Sequence[Iterable[T]]) -> set[T]:
    """What every collection holds."""
    common: set[T] = set(collections[0]) if collections else set()
    for other in collections[1:]:
        common &= set(other)
    return common
