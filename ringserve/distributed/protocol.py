"""Everything that crosses ranks: a fixed-size header, then an optional payload, by `all_sum`.

Rank 0 contributes the data and the other ranks zeros, so the sum is rank 0's data on every
rank. The length travels in the header, so there is no fixed payload size. One word of the
header is every rank's own: whether its last action failed, so the sum counts the ranks that
failed and every rank learns it from the same exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import mlx.core as mx
import numpy as np


class Op(IntEnum):
    IDLE = 0
    GENERATE = 1
    STEP = 2
    FINISH = 3
    TELEMETRY = 4
    SHUTDOWN = 5


class FinishCode(IntEnum):
    STOP = 0
    LENGTH = 1
    CANCELLED = 2
    FAILED = 3


HEADER_WORDS = 5


@dataclass(frozen=True)
class Header:
    op: Op
    length: int = 0
    request_id: int = 0
    code: int = 0
    failures: int = 0  # ranks whose last action failed (each rank adds its own)

    def to_words(self) -> list[int]:
        return [int(self.op), self.length, self.request_id, self.code, self.failures]

    @classmethod
    def from_words(cls, words: list[int]) -> Header:
        op, length, request_id, code, failures = words
        return cls(Op(op), length, request_id, code, failures)


class Collectives:
    """The rank protocol over one MLX group, on one stream so it stays ordered with the model's
    own collectives (a second stream could interleave them differently on each rank)."""

    def __init__(self, group: mx.distributed.Group, stream: Any) -> None:
        self.group = group
        self.stream = stream
        self.rank = group.rank()
        self.size = group.size()

    def _sum(self, array: mx.array) -> mx.array:
        if self.size == 1:
            return array
        summed = mx.distributed.all_sum(array, group=self.group, stream=self.stream)
        mx.eval(summed)
        return summed

    def exchange_header(self, header: Header | None, failed: bool = False) -> Header:
        """Rank 0 passes the header it decided on; every rank returns it, with `failures`
        counting the ranks that passed `failed`."""
        words = header.to_words() if self.rank == 0 and header else [0] * HEADER_WORDS
        words[-1] = int(failed)
        summed = self._sum(mx.array(words, dtype=mx.int32))
        return Header.from_words([int(w) for w in np.array(summed, copy=False)])

    def broadcast_bytes(self, data: bytes, length: int) -> bytes:
        """Rank 0's `data` (of `length` bytes, announced in the header) on every rank."""
        if length == 0:
            return b""
        if self.rank == 0:
            buffer = np.frombuffer(data, dtype=np.uint8)
        else:
            buffer = np.zeros(length, dtype=np.uint8)
        summed = self._sum(mx.array(buffer))
        return bytes(np.array(summed, copy=False))

    def gather_bytes(self, mine: bytes) -> list[bytes]:
        """Every rank's bytes on every rank: lengths first, then one buffer with a slot each."""
        lengths_in = np.zeros(self.size, dtype=np.int32)
        lengths_in[self.rank] = len(mine)
        lengths = np.array(self._sum(mx.array(lengths_in)), copy=False).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        buffer = np.zeros(int(offsets[-1]), dtype=np.uint8)
        start = int(offsets[self.rank])
        buffer[start : start + len(mine)] = np.frombuffer(mine, dtype=np.uint8)
        summed = np.array(self._sum(mx.array(buffer)), copy=False)
        return [bytes(summed[offsets[i] : offsets[i + 1]]) for i in range(self.size)]
