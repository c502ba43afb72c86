"""Side effects across hosts without a ring: pre-flight checks, probing and stopping."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringserve.cluster.hosts_start import checked_hosts
from ringserve.cluster.local import pid_alive, start_detached
from ringserve.cluster.processes import probe, stop_records
from ringserve.cluster.spec import RankLaunch
from ringserve.cluster.state import ProcessRecord
from ringserve.errors import RemoteHostError
from tests.netns import NetnsCluster, host_b, ssh_settings
from tests.ring import local_record

pytestmark = pytest.mark.netns


def sleeper(tmp_path: Path) -> ProcessRecord:
    process = start_detached(
        RankLaunch(
            rank=0,
            host="localhost",
            argv=("sleep", "600"),
            cwd=str(tmp_path),
            log_path=str(tmp_path / "sleep.log"),
        )
    )
    return local_record(process)


def test_every_failing_host_is_named_on_its_own_line(
    netns_on_a: NetnsCluster, tmp_path: Path
) -> None:
    cluster = netns_on_a
    silent = host_b(cluster, host=cluster.silent_address)
    wrong_key = host_b(cluster, key_file=str(cluster.wrong_key))
    with (
        pytest.raises(RemoteHostError) as caught,
        checked_hosts(
            [silent, wrong_key, host_b(cluster)], ssh_settings(cluster), str(tmp_path / "absent")
        ),
    ):
        pass
    lines = str(caught.value).splitlines()
    assert lines[0].endswith("nothing was started:")
    assert lines[1].strip().startswith(f"root@{cluster.silent_address}: unreachable")
    assert lines[2].strip().startswith(f"root@{cluster.b.address}: authentication failed")
    assert lines[3].strip().startswith(f"root@{cluster.b.address}: the model is not at")
    assert "RINGSERVE_MODEL" in lines[3]


def test_an_unreachable_host_is_reported_and_the_rest_still_stop(
    netns_on_a: NetnsCluster, tmp_path: Path
) -> None:
    cluster = netns_on_a
    here = sleeper(tmp_path)
    away = ProcessRecord(
        role="rank",
        rank=1,
        host=f"root@{cluster.silent_address}",
        pid=here.pid,  # never signalled: its host cannot be reached
        log_path="rank1.log",
        remote=host_b(cluster, host=cluster.silent_address),
    )
    try:
        infos = probe([here, away], ssh_settings(cluster))
        assert infos[0].alive and infos[0].rss_bytes
        assert infos[1].alive is None and "unreachable" in infos[1].problem

        report = stop_records([here, away], ssh_settings(cluster))
        assert report.left == [away]
        assert "unreachable" in report.problems[0] and "may still run" in report.problems[0]
        assert not pid_alive(here.pid)
    finally:
        stop_records([here], ssh_settings(cluster))
