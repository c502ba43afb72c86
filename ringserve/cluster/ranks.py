"""What to start for each rank: the RankLaunch and the small files it reads, on its own host."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ringserve.cluster.hosts import Placement, host_python, host_workdir, rank_env, rank_file_path
from ringserve.cluster.spec import RankLaunch
from ringserve.config.settings import PROJECT_DIR, Settings
from ringserve.platform.cpu_share import CPU_SLICE_VAR, cpu_slice_value

REMOTE_RUN_DIR = ".ringserve/run"


@dataclass(frozen=True)
class RankPlan:
    """A rank to start and the files (path on its host -> content) to write there first."""

    placement: Placement
    launch: RankLaunch
    files: dict[str, str]


def plan_ranks(
    settings: Settings,
    placements: Sequence[Placement],
    entry: Sequence[str] = ("server.py",),
    extra_env: Mapping[str, str] | None = None,
    project_dir: Path = PROJECT_DIR,
    local_python: str = sys.executable,
) -> list[RankPlan]:
    """One plan per rank: local ranks run from this checkout, remote ones from the pushed copy."""
    envs = rank_env(placements, settings.backend, settings.ring_port)
    plans = []
    for placement, mlx_env in zip(placements, envs, strict=True):
        if placement.is_local:
            cwd, run_dir, python = str(project_dir), str(settings.run_dir), local_python
        else:
            cwd = host_workdir(placement.host, settings)
            run_dir = str(PurePosixPath(cwd) / REMOTE_RUN_DIR)
            python = host_python(placement.host, settings)
        rank = placement.rank
        cpu_slice = _cpu_slice_env(settings, placement)
        paths = {name: rank_file_path(run_dir, rank, name) for name in mlx_env.files}
        seen_from_cwd = {name: _from_cwd(path, cwd) for name, path in paths.items()}
        launch = RankLaunch(
            rank=rank,
            host=placement.host.host,
            argv=(python, *entry),
            cwd=cwd,
            env={**(extra_env or {}), **cpu_slice, **mlx_env.with_file_paths(seen_from_cwd)},
            log_path=str(PurePosixPath(run_dir) / f"rank{rank}.log"),
            pid_path=str(PurePosixPath(run_dir) / f"rank{rank}.pid"),
        )
        files = {paths[name]: content for name, content in mlx_env.files.items()}
        plans.append(RankPlan(placement, launch, files))
    return plans


def _cpu_slice_env(settings: Settings, placement: Placement) -> dict[str, str]:
    """Which slice of its host's CPUs the rank keeps to, when the host runs several ranks."""
    ranks_on_host = placement.host.ranks
    if not settings.pin_cpus or ranks_on_host <= 1:
        return {}
    return {CPU_SLICE_VAR: cpu_slice_value(placement.local_rank, ranks_on_host)}


def _from_cwd(path: str, cwd: str) -> str:
    """A path written relative to the remote home, as the rank (running in `cwd`) must name it."""
    file, workdir = PurePosixPath(path), PurePosixPath(cwd)
    if file.is_absolute() or not file.is_relative_to(workdir):
        return path
    return str(file.relative_to(workdir))
