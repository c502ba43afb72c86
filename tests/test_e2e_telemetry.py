"""A CPU ring reports what each rank runs on, and refuses to start without memory for its share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ringserve.cluster.local import group_alive
from ringserve.platform.cpu_share import cpu_cores, cpu_share, describe_cpus
from tests.ring import launch, ring_env, running_ring

pytestmark = pytest.mark.e2e


def _flat(text: str) -> str:
    # rich wraps long lines at the terminal width; compare words, not line breaks.
    return " ".join(text.split())


def test_a_cpu_ring_reports_each_rank_s_platform_and_memory(
    tmp_path: Path, models_dir: Path
) -> None:
    with running_ring(tmp_path / "run", models_dir) as ring:
        with ring.http() as http:
            reply = http.get("/gpu/info")
        assert reply.status_code == 200
        ranks = reply.json()["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        for report in ranks:
            assert report["platform"] == "cpu"
            assert report["gpus"] == []
            assert report["gpu_reason"]
            assert 0 < report["host_memory_available"] <= report["host_memory_total"]
            assert report["device"].startswith("no GPU: running on CPU")
        assert ranks[0]["pid"] != ranks[1]["pid"]
        if hasattr(os, "sched_getaffinity"):  # Linux: each rank's own slice of the CPUs
            allowed = sorted(os.sched_getaffinity(0))
            for report in ranks:
                share = cpu_share(allowed, report["rank"], 2, cpu_cores(allowed)) or allowed
                assert report["cpus"] == describe_cpus(share)

        for rank in (0, 1):
            log = (tmp_path / "run" / "logs" / f"rank{rank}.log").read_text()
            assert "no GPU: running on CPU" in log
            assert "memory check passed" in log

        status = ring.launch("status")
        shown = _flat(status.stdout)
        assert "GPUs and memory" in shown
        assert f"host {ranks[0]['hostname']}: RAM" in shown
        assert f"no GPU listed: {ranks[0]['gpu_reason']}" in shown
        cpus = f", CPUs {ranks[1]['cpus']}" if ranks[1]["cpus"] else ""
        assert f"rank 1 (pid {ranks[1]['pid']}{cpus})" in shown


def _start_fails(tmp_path: Path, models_dir: Path, **settings: str) -> str:
    """Start a ring that must refuse; return what launch.py printed, checking nothing is left."""
    run_dir = tmp_path / "run"
    env = ring_env(run_dir, models_dir, ranks=2, **settings)
    try:
        result = launch(env, "start", check=False)
        assert result.returncode != 0
        # The run state is cleared by the failed start; the PID files stay behind.
        pids = [int(f.read_text()) for f in run_dir.glob("*.pid")]
        assert len(pids) == 4  # two ranks, the API and the keeper were started
        assert not [pid for pid in pids if group_alive(pid)], "a process outlived the start"
        return _flat(result.stdout + result.stderr)
    finally:
        launch(env, "stop", check=False)


def test_a_ring_without_memory_for_its_share_refuses_to_start(
    tmp_path: Path, models_dir: Path
) -> None:
    output = _start_fails(tmp_path, models_dir, memory_budget="65536")
    assert "exited during start" in output
    assert "has 0.1 MiB budgeted by RINGSERVE_MEMORY_BUDGET but needs" in output
    assert "for 2 of 2 ranks of ringserve-tiny" in output


def test_nccl_on_a_host_without_cuda_fails_at_start_instead_of_hanging(
    tmp_path: Path, models_dir: Path
) -> None:
    output = _start_fails(tmp_path, models_dir, backend="nccl")
    assert "RINGSERVE_BACKEND=nccl needs MLX CUDA on every rank" in output
    assert "runs on cpu" in output
