"""Ranks that share a host each keep to their own slice of its CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringserve.cluster.hosts import rank_placements
from ringserve.cluster.ranks import plan_ranks
from ringserve.config.settings import HostSpec, Settings
from ringserve.platform.cpu_share import (
    CPU_SLICE_VAR,
    cpu_cores,
    cpu_share,
    describe_cpus,
    parse_cpu_slice,
)

PROJECT_DIR = Path(__file__).resolve().parents[1]


def test_shares_are_equal_contiguous_and_cover_every_cpu() -> None:
    cpus = list(range(16))
    shares = [cpu_share(cpus, index, 3) for index in range(3)]
    assert shares == [list(range(0, 5)), list(range(5, 10)), list(range(10, 16))]


def test_shares_follow_the_cpus_this_process_may_use() -> None:
    assert cpu_share([7, 3, 5, 1], 1, 2) == [5, 7]


def test_a_rank_gets_whole_cores_not_one_hyperthread_of_each() -> None:
    # Two cores with two threads each, numbered as Linux does: 0-1 first threads, 2-3 second.
    cores = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}
    assert [cpu_share([0, 1, 2, 3], i, 2, cores) for i in range(2)] == [[0, 2], [1, 3]]


def test_cores_are_read_from_sysfs(tmp_path: Path) -> None:
    for cpu, core in ((0, 0), (1, 1), (2, 0)):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert cpu_cores([0, 1, 2, 3], sysfs=tmp_path) == {0: (0, 0), 1: (0, 1), 2: (0, 0)}


@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/topology").is_dir(), reason="sysfs")
def test_this_machine_describes_its_cpus() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert set(cpu_cores(allowed)) == set(allowed)


def test_no_share_for_a_rank_alone_or_more_ranks_than_cpus() -> None:
    assert cpu_share([0, 1, 2, 3], 0, 1) is None
    assert cpu_share([0, 1], 2, 3) is None


def test_slice_values_are_checked() -> None:
    assert parse_cpu_slice("1/2") == (1, 2)
    for bad in ("2/2", "1", "a/2", "-1/2"):
        with pytest.raises(ValueError, match=CPU_SLICE_VAR):
            parse_cpu_slice(bad)


def test_cpu_lists_read_as_linux_writes_them() -> None:
    assert describe_cpus([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


def test_pinning_can_be_turned_off(tmp_path: Path) -> None:
    settings = Settings(hosts=(HostSpec(host="10.0.0.1", ranks=2),), pin_cpus=False)
    plans = plan_ranks(settings, rank_placements(settings, 0), project_dir=tmp_path)
    assert all(CPU_SLICE_VAR not in plan.launch.env for plan in plans)


THREADS_SEEN = """
import os, threading
seen = []
thread = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
thread.start(); thread.join()
print(sorted(os.sched_getaffinity(0)), seen[0])
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_a_process_and_the_threads_it_starts_keep_to_its_share() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    code = "from ringserve.platform.cpu_share import pin_to_cpu_share\n"
    code += "import os; pinning = pin_to_cpu_share(os.environ)\n"
    code += f"print(pinning.note); print(pinning.own_cpus)\n{THREADS_SEEN}"
    env = {**os.environ, CPU_SLICE_VAR: "1/2"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=PROJECT_DIR, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    said, own_cpus, affinity = done.stdout.splitlines()
    expected = cpu_share(allowed, 1, 2, cpu_cores(allowed))
    if expected is None:
        assert said.startswith("not pinned:") and own_cpus == "False"
        expected = allowed
    else:
        assert said.startswith(f"pinned to CPUs {describe_cpus(expected)} ")
        assert own_cpus == "True"
    assert affinity == f"{expected} {expected}"
