"""The keeper's decisions and what the ranks and the keeper tell each other: pure, no ring."""

from __future__ import annotations

import time
from pathlib import Path

from ringserve.cluster.healing import (
    MAX_BACKOFF_S,
    HostFailures,
    RankFate,
    backoff_s,
    diagnose,
)
from ringserve.cluster.keeper import Keeper
from ringserve.cluster.state import ProcessRecord, RunState
from ringserve.config.settings import HostSpec, Settings
from ringserve.ipc.keeper_report import (
    STALE_AFTER_S,
    KeeperReport,
    cannot_serve_line,
    cannot_serve_reason,
    left_ring_line,
    left_ring_reason,
    read_report,
    write_report,
)

A = HostSpec(host="10.0.0.1", ranks=2)
B = HostSpec(host="10.0.0.2", user="me")


def rank(number: int, pid: int, remote: HostSpec | None = None) -> ProcessRecord:
    host = "localhost" if remote is None else remote.host
    return ProcessRecord(role="rank", rank=number, host=host, pid=pid, log_path="", remote=remote)


def test_a_rank_that_died_is_the_fault_and_its_host_is_blamed() -> None:
    fault = diagnose(
        [
            RankFate(rank(0, 10), "left", "lost contact with the other ranks"),
            RankFate(rank(1, 11), "alive"),
            RankFate(rank(2, 12, B), "died"),
        ]
    )
    assert fault.cause == "a rank died"
    assert fault.reason == "rank 2 (pid 12 on me@10.0.0.2) died"
    assert fault.failed_hosts == (B,)


def test_a_rank_on_this_machine_that_died_blames_no_host() -> None:
    fault = diagnose([RankFate(rank(0, 10), "alive"), RankFate(rank(1, 11), "died")])
    assert fault.reason == "rank 1 (pid 11 on this machine) died" and fault.failed_hosts == ()


def test_a_host_that_cannot_be_asked_is_blamed() -> None:
    fault = diagnose(
        [RankFate(rank(0, 10), "left", "x"), RankFate(rank(1, 11, B), "unknown", "unreachable")]
    )
    assert fault.cause == "a host cannot be reached"
    assert fault.reason == "rank 1: unreachable" and fault.failed_hosts == (B,)


def test_ranks_that_left_say_what_happened_when_none_died() -> None:
    frozen = diagnose(
        [
            RankFate(rank(0, 10), "left", "a rank has not answered for 35.0 s"),
            RankFate(rank(1, 11), "alive"),
        ]
    )
    assert frozen.cause == "a rank stopped answering" and frozen.failed_hosts == ()
    assert (
        frozen.reason
        == "rank 0 (pid 10 on this machine) left the ring: a rank has not answered for 35.0 s"
    )
    broke = diagnose([RankFate(rank(0, 10), "left", "x"), RankFate(rank(1, 11), "left", "y")])
    assert broke.cause == "the ring broke"


def test_backoff_starts_at_once_then_doubles_to_its_cap() -> None:
    assert [backoff_s(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert backoff_s(50) == MAX_BACKOFF_S


def test_a_host_is_left_out_after_its_limit_of_failures_within_the_window() -> None:
    failures = HostFailures(limit=2)
    now = 10_000.0
    failures.add(B, now - 3600)  # long ago: it does not count
    failures.add(B, now - 5)
    assert failures.failing([A, B], now) == []
    failures.add(B, now)
    assert failures.failing([A, B], now) == [B]


def run_state(revision: str = "") -> RunState:
    return RunState(
        started_at=0,
        model="/models/m",
        demo_model=False,
        launcher="direct",
        backend="ring",
        api_url="http://127.0.0.1:8000",
        processes=(),
        model_revision=revision,
    )


def test_a_restart_without_a_host_splits_the_model_over_the_rest_as_a_pipeline() -> None:
    keeper = Keeper(Settings(hosts=(A, B), parallel="tensor"))
    same = keeper.ring_settings(run_state())
    assert same.hosts == (A, B) and same.parallel == "tensor"
    keeper.left_out.append("me@10.0.0.2")
    reduced = keeper.ring_settings(run_state("abc123"))
    assert reduced.hosts == (A,) and reduced.parallel == "pipeline" and reduced.world_size == 2
    assert reduced.model_revision == "abc123"


def test_a_rank_says_why_it_left_and_only_its_own_words_count() -> None:
    log = "\n".join(
        [
            "12:00 rank0 ERROR ringserve.engine.ring_exit: " + left_ring_line(41, "old news"),
            "12:01 rank0 INFO ringserve.rank: rank 0 of 2 ready",
            "12:02 rank0 ERROR ringserve.engine.ring_exit: " + left_ring_line(42, "lost contact"),
        ]
    )
    assert left_ring_reason(log, 42) == "lost contact"
    assert left_ring_reason(log, 41) == "old news"
    assert left_ring_reason(log, 43) is None  # killed: it said nothing
    refused = "12:03 rank1 ERROR ringserve.server: " + cannot_serve_line(7, "heads do not divide")
    assert cannot_serve_reason(refused, 7) == "heads do not divide"
    assert cannot_serve_reason(log, 42) is None


def test_the_keepers_report_tells_whether_it_watches(tmp_path: Path) -> None:
    assert read_report(tmp_path) is None
    report = KeeperReport(pid=1, looked_at=time.time(), restarts=2)
    write_report(tmp_path, report)
    assert read_report(tmp_path) == report and report.watching()
    assert not report.watching(now=time.time() + STALE_AFTER_S + 1)  # its keeper is gone
    assert not report.model_copy(update={"gave_up": "no room"}).watching()
    (tmp_path / "keeper.json").write_text("{half a rep")
    assert read_report(tmp_path) is None
