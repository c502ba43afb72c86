"""No signal reaches a process that is not the one a run started: real processes, told apart
by when they started and their command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringserve.cluster.local import pid_alive, start_detached
from ringserve.cluster.process_identity import (
    FOREIGN,
    GONE,
    OURS,
    ownership,
    process_identity,
    stop_groups,
)
from ringserve.cluster.processes import probe, stop_records
from ringserve.cluster.spec import RankLaunch
from ringserve.cluster.state import ProcessRecord, RunState, save_state
from ringserve.config.settings import Settings
from tests.ring import launch


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process no run started, leading its own group (as a reboot's new process might)."""
    process = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def started(tmp_path: Path, *argv: str) -> ProcessRecord:
    process = start_detached(
        RankLaunch(0, "localhost", argv, str(tmp_path), log_path=str(tmp_path / "p.log"))
    )
    return ProcessRecord(
        role="rank",
        rank=0,
        host="localhost",
        pid=process.pid,
        log_path="",
        identity=process.identity,
    )


def test_the_identity_is_the_start_and_the_command(stranger: subprocess.Popen[bytes]) -> None:
    identity = process_identity(stranger.pid)
    assert identity is not None and identity.endswith("|sleep 600")
    assert process_identity(stranger.pid) == identity  # stable
    assert process_identity(os.getpid()) != identity
    assert process_identity(2**22 + 7) is None


def test_a_record_whose_pid_is_another_process_is_never_signalled(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    ours = started(tmp_path, "sleep", "601")
    # The stranger's PID, recorded with our process's identity (as after a reboot); and a record
    # from a run written without identities.
    reused = ours.model_copy(update={"pid": stranger.pid})
    unknown = ours.model_copy(update={"pid": stranger.pid, "identity": None})
    assert ownership(ours.pid, ours.identity) == OURS
    assert ownership(reused.pid, reused.identity) == FOREIGN
    infos = probe([ours, reused, unknown], Settings())
    assert [info.alive for info in infos] == [True, False, False]
    assert "left alone" in infos[1].problem
    report = stop_records([reused, unknown, ours], Settings())
    assert not report.left
    assert stranger.poll() is None  # untouched
    assert not pid_alive(ours.pid)
    assert ownership(ours.pid, ours.identity) == GONE


def test_a_group_whose_leader_died_is_still_stopped(tmp_path: Path) -> None:
    script = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(0.5)"
    leader = started(tmp_path, sys.executable, "-c", script)
    deadline = time.monotonic() + 10
    while pid_alive(leader.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ownership(leader.pid, leader.identity) == OURS  # its sleep still holds the group
    assert stop_groups({leader.pid: leader.identity}, 5.0) == {leader.pid: "terminated"}
    assert ownership(leader.pid, leader.identity) == GONE


def test_launch_stop_and_status_leave_a_stranger_named_in_the_state_alone(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = ProcessRecord(role="rank", rank=0, host="localhost", pid=stranger.pid, log_path="x")
    state = RunState(
        started_at=time.time(),
        model="m",
        demo_model=True,
        launcher="direct",
        backend="ring",
        api_url="http://127.0.0.1:9",
        processes=(record,),
    )
    save_state(run_dir, state)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    env["RINGSERVE_RUN_DIR"] = str(run_dir)
    status = launch(env, "status", check=False)
    assert "DEAD" in status.stdout + status.stderr
    assert "left alone" in (status.stdout + status.stderr).replace("\n", " ")
    launch(env, "stop")
    time.sleep(0.5)
    assert stranger.poll() is None
    assert not (run_dir / "state.json").exists()
