"""Rank 0's next move from what it knows: pure decisions, no ring."""

from __future__ import annotations

from ringserve.distributed.ops import Removal
from ringserve.distributed.protocol import FinishCode, Op
from ringserve.engine.decisions import Plan, Snapshot, plan


def now(
    running: int = 0,
    ending: tuple[tuple[int, FinishCode], ...] = (),
    waiting: int = 0,
    telemetry: bool = False,
    shutdown: bool = False,
    max_sequences: int = 4,
) -> Snapshot:
    return Snapshot(shutdown, running, ending, waiting, telemetry, max_sequences)


def test_nothing_to_do_is_idle_and_running_sequences_step() -> None:
    assert plan(now()) == Plan(Op.IDLE)
    assert plan(now(running=3)) == Plan(Op.STEP)


def test_waiting_requests_are_admitted_while_there_is_room() -> None:
    assert plan(now(waiting=2)) == Plan(Op.TICK, admit=2)
    assert plan(now(running=3, waiting=5)) == Plan(Op.TICK, admit=1)
    assert plan(now(running=4, waiting=5)) == Plan(Op.STEP)  # full: they wait


def test_ending_sequences_leave_and_make_room_in_the_same_tick() -> None:
    ending = ((7, FinishCode.STOP), (9, FinishCode.CANCELLED))
    decided = plan(now(running=4, ending=ending, waiting=5))
    removals = (
        Removal(request_id=7, code=FinishCode.STOP),
        Removal(request_id=9, code=FinishCode.CANCELLED),
    )
    assert decided == Plan(Op.TICK, removals, admit=2)


def test_telemetry_rides_a_tick_and_shutdown_wins() -> None:
    assert plan(now(running=2, telemetry=True)) == Plan(Op.TICK, telemetry=True)
    assert plan(now(running=2, waiting=1, telemetry=True, shutdown=True)) == Plan(Op.SHUTDOWN)
