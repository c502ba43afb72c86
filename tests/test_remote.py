"""Host B as a rank host: its Python is checked, a rank starts there detached and is stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringserve.cluster.hosts import rank_placements
from ringserve.cluster.ranks import plan_ranks
from ringserve.cluster.remote import RemoteHost, check_host, local_versions
from ringserve.cluster.spec import RankLaunch
from ringserve.config.settings import HostSpec
from ringserve.errors import RemoteHostError
from tests.netns import NetnsCluster, host_b, ssh_settings
from tests.ring import MKL_EXPECTED

pytestmark = pytest.mark.netns

SYSTEM_PYTHON = "/usr/bin/python3"


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_host_with_the_same_mlx_passes_the_check(netns_on_a: NetnsCluster) -> None:
    report = check_host(host_b(netns_on_a), ssh_settings(netns_on_a))
    assert (report.mlx, report.mlx_lm) == tuple(local_versions().values())
    if MKL_EXPECTED:  # the probe found the CPU build and MKL beside it
        assert report.cpu_blas_problem is None


def test_a_python_without_mlx_is_named_with_the_fix(netns_on_a: NetnsCluster) -> None:
    if os.system(f"{SYSTEM_PYTHON} -c 'import mlx' 2>/dev/null") == 0:
        pytest.skip(f"{SYSTEM_PYTHON} has mlx")
    with pytest.raises(RemoteHostError) as caught:
        check_host(host_b(netns_on_a, python=SYSTEM_PYTHON), ssh_settings(netns_on_a))
    message = str(caught.value)
    assert message.startswith(f"root@{netns_on_a.b.address}: {SYSTEM_PYTHON} cannot import mlx")
    assert "install mlx==" in message


def test_a_missing_python_is_named_with_the_fix(netns_on_a: NetnsCluster) -> None:
    with pytest.raises(
        RemoteHostError, match=r"python '/nowhere/python3' does not run .* RINGSERVE"
    ):
        check_host(host_b(netns_on_a, python="/nowhere/python3"), ssh_settings(netns_on_a))


def test_different_versions_are_refused(netns_on_a: NetnsCluster) -> None:
    with pytest.raises(RemoteHostError, match=r"has mlx .* but this machine has 0\.0\.1"):
        check_host(host_b(netns_on_a), ssh_settings(netns_on_a), {"mlx": "0.0.1"})


def test_an_unreachable_host_fails_before_anything_starts(netns_on_a: NetnsCluster) -> None:
    silent = host_b(netns_on_a).model_copy(update={"host": netns_on_a.silent_address})
    with pytest.raises(RemoteHostError, match="unreachable"):
        check_host(silent, ssh_settings(netns_on_a))


def test_a_rank_started_remotely_runs_detached_until_stopped(netns_on_a: NetnsCluster) -> None:
    cluster = netns_on_a
    run_dir = cluster.b.workdir / ".ringserve" / "run"
    script = "import os, time; print(os.environ['MLX_RANK'], os.environ['ODD'], flush=True); "
    script += "import subprocess; subprocess.Popen(['sleep', '600']); time.sleep(600)"
    launch = RankLaunch(
        rank=1,
        host=cluster.b.address,
        argv=(sys.executable, "-c", script),
        cwd=str(cluster.b.workdir),
        env={"MLX_RANK": "1", "ODD": "it's $HOME; `true`"},
        log_path=str(run_dir / "rank1.log"),
        pid_path=str(run_dir / "rank1.pid"),
    )
    cluster.b.workdir.mkdir(parents=True, exist_ok=True)
    with RemoteHost.open(host_b(cluster), ssh_settings(cluster)) as host:
        process = host.start(launch)
    assert int(Path(launch.pid_path).read_text()) == process.pid
    assert os.getpgid(process.pid) == process.pid

    with RemoteHost.open(host_b(cluster), ssh_settings(cluster)) as host:
        assert host.alive(process.pid, process.identity)
        deadline = time.monotonic() + 10
        while "1 it's $HOME; `true`" not in host.log_tail(launch.log_path):
            assert time.monotonic() < deadline, host.log_tail(launch.log_path)
            time.sleep(0.05)
        children = [
            int(p) for p in os.listdir("/proc") if p.isdigit() and _group_of(int(p)) == process.pid
        ]
        assert len(children) == 2  # the rank and the sleep it started

        assert host.stop({process.pid: process.identity}, grace=5) == {process.pid: "terminated"}
        assert not host.alive(process.pid, process.identity)
        assert host.stop({process.pid: process.identity}) == {process.pid: "gone"}
    assert not any(running(pid) for pid in children)


def test_a_rank_that_ignores_sigterm_is_killed(netns_on_a: NetnsCluster) -> None:
    cluster = netns_on_a
    run_dir = cluster.b.workdir / ".ringserve" / "run"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    stubborn += "print('ready', flush=True); time.sleep(600)"
    launch = RankLaunch(
        rank=2,
        host=cluster.b.address,
        argv=(sys.executable, "-c", stubborn),
        cwd="",
        log_path=str(run_dir / "rank2.log"),
        pid_path=str(run_dir / "rank2.pid"),
    )
    with RemoteHost.open(host_b(cluster), ssh_settings(cluster)) as host:
        process = host.start(launch)
        deadline = time.monotonic() + 10
        while "ready" not in host.log_tail(launch.log_path):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert host.stop({process.pid: process.identity}, grace=0.5) == {process.pid: "killed"}
    assert not running(process.pid)


def _group_of(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[2]) if fields[0] != "Z" else None


def test_a_planned_rank_finds_its_hostfile_on_the_remote_host(netns_on_a: NetnsCluster) -> None:
    cluster = netns_on_a
    host_a = HostSpec(host=cluster.a.address)
    settings = ssh_settings(cluster).model_copy(update={"hosts": (host_a, host_b(cluster))})
    show_hostfile = "import os; print(open(os.environ['MLX_HOSTFILE']).read(), flush=True); "
    show_hostfile += "import time; time.sleep(600)"
    plan = plan_ranks(settings, rank_placements(settings, 0), entry=("-c", show_hostfile))[1]

    with RemoteHost.open(plan.placement.host, settings) as host:
        host.write_files(plan.files)
        process = host.start(plan.launch)
        deadline = time.monotonic() + 10
        while "10.213.7.2:32324" not in host.log_tail(plan.launch.log_path):
            assert time.monotonic() < deadline, host.log_tail(plan.launch.log_path)
            time.sleep(0.05)
        assert host.stop({process.pid: process.identity}) == {process.pid: "terminated"}
    assert not running(process.pid)


def test_a_pid_that_is_another_process_there_is_left_alone(netns_on_a: NetnsCluster) -> None:
    """The test hosts share this machine's PIDs: a stranger started here is one there too."""
    cluster = netns_on_a
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        with RemoteHost.open(host_b(cluster), ssh_settings(cluster)) as host:
            recorded = {stranger.pid: "an identity it never had"}
            assert host.process_info(recorded) == {stranger.pid: ("foreign", None)}
            assert host.stop(recorded) == {stranger.pid: "foreign"}
            assert host.stop({stranger.pid: None}) == {stranger.pid: "foreign"}
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
