"""Everything that crosses ranks: one header per engine step, then a payload when there is
news, both by `all_sum`.

Rank 0 contributes the data and the other ranks zeros, so the sum is rank 0's data on every
rank. The length travels in the header, so there is no fixed payload size.

The header also has a region of its own for every rank: whether its last action failed, and
the tokens it took in the step before. The sum puts every rank's region before every rank, so
every rank learns in the same exchange, before it acts on anything, whether some rank failed or
took other tokens than rank 0 (ranks that disagree on a token would go on with different KV
caches, and their collectives would later pair up wrong or hang), and decides alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import mlx.core as mx
import numpy as np


class Op(IntEnum):
    IDLE = 0
    STEP = 1  # a decode (and prefill) step, with no news
    TICK = 2  # news in the payload: admissions, removals, telemetry; and maybe a step
    SHUTDOWN = 3


class FinishCode(IntEnum):
    STOP = 0
    LENGTH = 1
    CANCELLED = 2
    FAILED = 3


FIXED_WORDS = 2  # op, payload length
RANK_WORDS = 2  # each rank's own: failed, number of tokens; then its token slots


@dataclass(frozen=True)
class Header:
    op: Op
    length: int = 0
    tokens: tuple[int, ...] = field(default=())  # rank 0's tokens of the step before
    failed: int = 0  # ranks whose last action failed
    diverged: int = 0  # ranks whose tokens of the step before were not rank 0's


class Collectives:
    """The rank protocol over one MLX group, on one stream so it stays ordered with the model's
    own collectives (a second stream could interleave them differently on each rank).

    `token_slots`: the most tokens one step takes (the batch size), the same on every rank."""

    def __init__(self, group: mx.distributed.Group, stream: Any, token_slots: int = 1) -> None:
        self.group = group
        self.stream = stream
        self.rank = group.rank()
        self.size = group.size()
        self.token_slots = token_slots

    def _sum(self, array: mx.array) -> mx.array:
        if self.size == 1:
            return array
        summed = mx.distributed.all_sum(array, group=self.group, stream=self.stream)
        mx.eval(summed)
        return summed

    def exchange_header(
        self, header: Header | None, tokens: tuple[int, ...] = (), failed: bool = False
    ) -> Header:
        """Rank 0 passes the op it decided on; every rank passes the tokens it took in its last
        step and whether its last action failed. Every rank returns the same header."""
        if len(tokens) > self.token_slots:
            raise ValueError(f"{len(tokens)} tokens exceed {self.token_slots} slots")
        region = RANK_WORDS + self.token_slots
        words = np.zeros(FIXED_WORDS + self.size * region, dtype=np.int32)
        if self.rank == 0 and header is not None:
            words[0], words[1] = int(header.op), header.length
        own = FIXED_WORDS + self.rank * region
        words[own], words[own + 1] = int(failed), len(tokens)
        words[own + RANK_WORDS : own + RANK_WORDS + len(tokens)] = tokens
        summed = np.array(self._sum(mx.array(words)), copy=False)
        taken = []
        for rank in range(self.size):
            start = FIXED_WORDS + rank * region
            count = int(summed[start + 1])
            taken.append(
                tuple(int(t) for t in summed[start + RANK_WORDS : start + RANK_WORDS + count])
            )
        return Header(
            op=Op(int(summed[0])),
            length=int(summed[1]),
            tokens=taken[0],
            failed=int(sum(summed[FIXED_WORDS + r * region] for r in range(self.size))),
            diverged=sum(t != taken[0] for t in taken),
        )

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
