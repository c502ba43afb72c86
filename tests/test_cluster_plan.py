"""Planning a start across hosts: which ranks run here, what each remote rank is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringserve.cluster.cluster_plan import plan_cluster
from ringserve.config.settings import HostSpec, Settings, load_settings
from ringserve.errors import ConfigError

HOSTS = (
    '[{"host": "10.0.0.1"}, {"host": "10.0.0.2", "ranks": 2, "workdir": "serve"},'
    ' {"host": "10.0.0.3", "user": "me"}]'
)


def hosts_settings(tmp_path: Path, **more: str) -> Settings:
    environ = {
        "RINGSERVE_HOSTS": HOSTS,
        "RINGSERVE_RUN_DIR": str(tmp_path / "run"),
        "RINGSERVE_HEARTBEAT_TIMEOUT": "3",
        **{f"RINGSERVE_{k.upper()}": v for k, v in more.items()},
    }
    return load_settings(env_file=tmp_path / "no.env", environ=environ)


def test_this_host_runs_rank_0_and_each_remote_host_is_prepared_once(tmp_path: Path) -> None:
    settings = hosts_settings(tmp_path)
    plan = plan_cluster(settings, {"127.0.0.1", "10.0.0.2"}, "/models/m", tmp_path / "logs")

    assert [(p.rank, p.host.host, p.is_local) for p in plan.placements] == [
        (0, "10.0.0.2", True),
        (1, "10.0.0.2", True),
        (2, "10.0.0.1", False),
        (3, "10.0.0.3", False),
    ]
    assert [h.host for h in plan.remote_hosts] == ["10.0.0.1", "10.0.0.3"]
    assert [h["ssh"] for h in plan.hostfile["hosts"]] == [
        "10.0.0.2",
        "10.0.0.2",
        "10.0.0.1",
        "me@10.0.0.3",
    ]
    assert plan.ranks[1].launch.log_path == str(tmp_path / "logs" / "rank1.log")


def test_a_remote_rank_gets_the_launchers_settings_and_the_resolved_model(
    tmp_path: Path,
) -> None:
    settings = hosts_settings(tmp_path)
    plan = plan_cluster(settings, {"10.0.0.1"}, "/models/m", tmp_path / "logs")
    here, there = plan.ranks[0].launch.env, plan.ranks[3].launch.env

    assert here["RINGSERVE_RUN_DIR"] == str(tmp_path / "run")
    assert there["RINGSERVE_RUN_DIR"] == ".ringserve/run"  # inside its pushed project
    assert there["RINGSERVE_MODEL"] == here["RINGSERVE_MODEL"] == "/models/m"
    assert there["RINGSERVE_HEARTBEAT_TIMEOUT"] == "3.0"
    assert there["MLX_RANK"] == "3"
    remote = {k: v for k, v in there.items() if k.startswith("RINGSERVE_")}
    assert load_settings(env_file=tmp_path / "no.env", environ=remote).world_size == 4


def test_mlx_launch_is_refused_across_hosts(tmp_path: Path) -> None:
    settings = hosts_settings(tmp_path, launcher="mlx")
    with pytest.raises(ConfigError, match="RINGSERVE_LAUNCHER=mlx runs rings on this machine"):
        plan_cluster(settings, {"10.0.0.1"}, "/models/m", tmp_path / "logs")


def test_a_machine_that_is_not_listed_is_refused(tmp_path: Path) -> None:
    settings = Settings(hosts=(HostSpec(host="10.0.0.1"), HostSpec(host="10.0.0.2")))
    with pytest.raises(ConfigError, match="none of the configured hosts"):
        plan_cluster(settings, {"127.0.0.1"}, "/models/m", tmp_path / "logs")
