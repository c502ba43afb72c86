"""The small pure pieces of the lockstep loop: headers, idle backoff, stop strings."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generation_stream

from ringserve.distributed.idle import IdleBackoff
from ringserve.distributed.protocol import Collectives, Header, Op
from ringserve.engine.stops import StopMatcher


def test_a_single_rank_group_exchanges_without_a_collective() -> None:
    collectives = Collectives(mx.distributed.init(), generation_stream, token_slots=4)
    tokens = (0, 7, 2**20)
    assert collectives.exchange_header(Header(Op.TICK, length=3), tokens) == Header(
        Op.TICK, length=3, tokens=tokens
    )
    failed = collectives.exchange_header(Header(Op.STEP), failed=True)
    assert (failed.failed, failed.diverged, failed.tokens) == (1, 0, ())
    with pytest.raises(ValueError):
        collectives.exchange_header(Header(Op.STEP), (1, 2, 3, 4, 5))
    assert collectives.broadcast_bytes("日本".encode(), 6) == "日本".encode()
    assert collectives.gather_bytes(b"rank0") == [b"rank0"]


def test_idle_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = IdleBackoff(first_s=0.001, max_s=0.05)
    sleeps = [backoff.next_sleep() for _ in range(10)]
    assert sleeps[:4] == [0.001, 0.002, 0.004, 0.008]
    assert sleeps[-1] == 0.05 and max(sleeps) == 0.05
    backoff.reset()
    assert backoff.next_sleep() == 0.001


def test_two_ranks_with_the_same_ops_sleep_the_same() -> None:
    a, b = IdleBackoff(), IdleBackoff()
    assert [a.next_sleep() for _ in range(20)] == [b.next_sleep() for _ in range(20)]


def test_stop_strings_hold_back_partial_matches() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("hello ST") == "hello "
    assert matcher.feed("O") == ""
    assert matcher.feed("RM") == "STORM"
    assert matcher.feed(" and ST") == " and "
    assert matcher.feed("OP here") == ""
    assert matcher.matched == "STOP"
    assert matcher.flush() == ""


def test_stop_across_pieces_and_the_earliest_of_several() -> None:
    matcher = StopMatcher(("world", "lo w"))
    assert matcher.feed("hel") == "he"  # "l" may begin "lo w"
    assert matcher.feed("lo world") == "l"  # "lo w" comes before "world"
    assert matcher.matched == "lo w"


def test_no_stop_strings_emit_everything() -> None:
    matcher = StopMatcher(())
    assert matcher.feed("abc") == "abc"
    assert matcher.flush() == ""
