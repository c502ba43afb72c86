"""Rank 0's next move, a pure function of what it knows: the sequences running and the ones
ending, the requests waiting, whether telemetry is wanted, whether to shut down.

A tick that changes the batch (removals, admissions) does not step: the exchange after it
tells every rank whether every rank applied it, before any rank runs a step on the new batch
(a rank that failed to admit a sequence must not run a step whose shapes differ from the
others'). Decode steps between changes carry no payload at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ringserve.distributed.ops import Removal
from ringserve.distributed.protocol import FinishCode, Op


@dataclass(frozen=True)
class Snapshot:
    shutdown: bool
    running: int  # sequences in the batch, the ones ending included
    ending: Sequence[tuple[int, FinishCode]]  # (request id, code) of those that leave now
    waiting: int  # requests in the queue
    telemetry: bool
    max_sequences: int


@dataclass(frozen=True)
class Plan:
    op: Op
    removals: tuple[Removal, ...] = ()
    admit: int = 0  # how many waiting requests to admit, oldest first
    telemetry: bool = False


def plan(now: Snapshot) -> Plan:
    if now.shutdown:
        return Plan(Op.SHUTDOWN)
    removals = tuple(Removal(request_id=rid, code=code) for rid, code in now.ending)
    staying = now.running - len(removals)
    admit = max(0, min(now.waiting, now.max_sequences - staying))
    if removals or admit or now.telemetry:
        return Plan(Op.TICK, removals, admit, now.telemetry)
    return Plan(Op.STEP if staying else Op.IDLE)
