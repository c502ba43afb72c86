"""What a multi-host start will do, decided before anything is contacted or started."""

from __future__ import annotations

import sys
from collections.abc import Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ringserve.cluster.hosts import (
    Placement,
    hostfile_json,
    rank_placements,
    validate_hosts,
)
from ringserve.cluster.ranks import REMOTE_RUN_DIR, RankPlan, plan_ranks
from ringserve.config.settings import PROJECT_DIR, HostSpec, Settings, settings_env
from ringserve.errors import ConfigError
from ringserve.platform.addresses import detect_local_host


@dataclass(frozen=True)
class ClusterPlan:
    """Every rank to start, the remote hosts to prepare (each once) and hosts.json."""

    ranks: list[RankPlan]
    remote_hosts: list[HostSpec]
    hostfile: dict[str, Any]

    @property
    def placements(self) -> list[Placement]:
        return [plan.placement for plan in self.ranks]


def rank_settings_env(settings: Settings, model_path: str, remote: bool) -> dict[str, str]:
    """The RINGSERVE_ settings a rank needs: the launcher's own, the model resolved, and a
    remote rank's run directory inside its pushed project (relative to where it runs)."""
    env = {**settings_env(settings), "RINGSERVE_MODEL": model_path}
    env.pop("RINGSERVE_API_KEY", None)  # ranks never see a client; keep it off other hosts
    if remote:
        env["RINGSERVE_RUN_DIR"] = REMOTE_RUN_DIR
        env["RINGSERVE_SOCKET_PATH"] = ""  # only rank 0 (local) serves the socket
    else:
        env["RINGSERVE_RUN_DIR"] = str(settings.run_dir)
    return env


def plan_cluster(
    settings: Settings,
    addresses: Set[str],
    model_path: str,
    logs_dir: Path,
    project_dir: Path = PROJECT_DIR,
    local_python: str = sys.executable,
) -> ClusterPlan:
    """Find this host among RINGSERVE_HOSTS (it runs rank 0) and plan every rank."""
    if settings.launcher != "direct":
        raise ConfigError(
            "RINGSERVE_LAUNCHER=mlx runs rings on this machine only; set RINGSERVE_LAUNCHER=direct "
            "to run across RINGSERVE_HOSTS"
        )
    validate_hosts(settings.hosts, settings.backend)
    local_index = detect_local_host(settings.hosts, set(addresses))
    placements = rank_placements(settings, local_index)
    plans = plan_ranks(settings, placements, project_dir=project_dir, local_python=local_python)
    ranks = []
    for plan in plans:
        remote = not plan.placement.is_local
        env = {**rank_settings_env(settings, model_path, remote), **plan.launch.env}
        if remote and plan.placement.host.hf_home:  # where `start` fetched the model there
            env["HF_HOME"] = plan.placement.host.hf_home
        launch = replace(plan.launch, env=env)
        if not remote:
            launch = replace(launch, log_path=str(logs_dir / f"rank{launch.rank}.log"))
        ranks.append(replace(plan, launch=launch))
    remote_hosts = list(dict.fromkeys(p.host for p in placements if not p.is_local))
    return ClusterPlan(ranks, remote_hosts, hostfile_json(placements, settings.backend))
