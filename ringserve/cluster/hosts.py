"""Which configured host is this one, where each rank runs, and the MLX environment per rank."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import ConfigError
from ringserve.platform.addresses import HOSTS_VAR, is_ip

log = logging.getLogger(__name__)

Backend = Literal["ring", "jaccl", "nccl"]


@dataclass(frozen=True)
class Placement:
    """One rank: the configured host it runs on and its position there."""

    rank: int
    host_index: int
    host: HostSpec
    local_rank: int
    is_local: bool


@dataclass(frozen=True)
class RankEnv:
    """A rank's MLX variables; `files` maps a variable to the content of the file it names."""

    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)

    def with_file_paths(self, paths: Mapping[str, str]) -> dict[str, str]:
        """The full environment once each file has been written at `paths[variable]`."""
        missing = sorted(set(self.files) - set(paths))
        if missing:
            raise ValueError(f"no path given for {', '.join(missing)}")
        return {**self.env, **{name: paths[name] for name in self.files}}


def validate_hosts(hosts: Sequence[HostSpec], backend: Backend) -> None:
    """Raise ConfigError for a host list the chosen backend cannot run on."""
    owner: dict[str, str] = {}
    for host in hosts:
        for ip in dict.fromkeys(host.ring_ips):
            if ip in owner:
                raise ConfigError(
                    f"{HOSTS_VAR}: address {ip} is listed for both {owner[ip]} and {host.host}; "
                    "every host needs its own addresses."
                )
            owner[ip] = host.host
    if backend == "ring":
        for host in hosts:
            names = [ip for ip in host.ring_ips if not is_ip(ip)]
            if names:
                raise ConfigError(
                    f"{HOSTS_VAR}: host {host.host} needs IP addresses for the ring backend, "
                    f"got {', '.join(names)}; set its `ips` to the addresses the ring uses."
                )
    if backend == "jaccl":
        _validate_rdma(hosts)


def _validate_rdma(hosts: Sequence[HostSpec]) -> None:
    world = len(hosts)
    for index, host in enumerate(hosts):
        if host.ranks != 1:
            raise ConfigError(
                f"{HOSTS_VAR}: host {host.host} has ranks={host.ranks}; the jaccl backend "
                "runs one rank per host."
            )
        if host.rdma is None or len(host.rdma) != world:
            got = "none" if host.rdma is None else f"{len(host.rdma)} entries"
            raise ConfigError(
                f"{HOSTS_VAR}: host {host.host} needs an `rdma` row with one entry per host "
                f"({world}) for the jaccl backend, got {got}."
            )
        if host.rdma[index] is not None:
            raise ConfigError(
                f"{HOSTS_VAR}: host {host.host} lists RDMA device {host.rdma[index]!r} "
                f"towards itself (rdma[{index}]); that entry must be null."
            )


def rank_placements(settings: Settings, local_index: int) -> list[Placement]:
    """Ranks in order: the local host first (it serves rank 0), then the others as configured."""
    hosts = settings.hosts
    if not 0 <= local_index < len(hosts):
        raise ConfigError(f"{HOSTS_VAR}: no host at index {local_index}")
    validate_hosts(hosts, settings.backend)
    order = [local_index, *(i for i in range(len(hosts)) if i != local_index)]
    placements: list[Placement] = []
    for host_index in order:
        for local_rank in range(hosts[host_index].ranks):
            placements.append(
                Placement(
                    rank=len(placements),
                    host_index=host_index,
                    host=hosts[host_index],
                    local_rank=local_rank,
                    is_local=host_index == local_index,
                )
            )
    return placements


def _ssh_name(host: HostSpec) -> str:
    return f"{host.user}@{host.host}" if host.user else host.host


def rdma_matrix(placements: Sequence[Placement]) -> list[list[str | None]]:
    """The jaccl device matrix in rank order (configured rows and columns follow the ranks)."""
    matrix = []
    for row in placements:
        rdma = row.host.rdma or ()
        matrix.append([rdma[col.host_index] for col in placements])
    return matrix


def hostfile_json(
    placements: Sequence[Placement], backend: Backend, envs: Sequence[str] = ()
) -> dict[str, Any]:
    """The `mlx.launch --hostfile` document for these ranks, one entry per rank."""
    matrix = rdma_matrix(placements) if backend == "jaccl" else None
    return {
        "backend": backend,
        "envs": list(envs),
        "hosts": [
            {
                "ssh": _ssh_name(p.host),
                "ips": list(p.host.ring_ips),
                "rdma": matrix[p.rank] if matrix is not None else [],
            }
            for p in placements
        ],
    }


def ring_addresses(placements: Sequence[Placement], base_port: int) -> list[list[str]]:
    """Each rank's `ip:port` list; the port grows by one per rank and address."""
    port = base_port
    ring = []
    for placement in placements:
        node = []
        for ip in placement.host.ring_ips:
            node.append(f"{ip}:{port}")
            port += 1
        ring.append(node)
    return ring


def rank_env(placements: Sequence[Placement], backend: Backend, base_port: int) -> list[RankEnv]:
    """Each rank's MLX environment, the way `mlx.launch` would set it for the backend."""
    world = len(placements)
    if world == 0:
        return []
    first_ip = placements[0].host.ring_ips[0]
    if backend in ("jaccl", "nccl") and not is_ip(first_ip):
        raise ConfigError(
            f"{HOSTS_VAR}: host {placements[0].host.host} serves rank 0 and needs an IP in `ips` "
            f"that every host can reach for the {backend} backend."
        )
    envs = []
    if backend == "ring":
        hostfile = json.dumps(ring_addresses(placements, base_port)) if world > 1 else ""
        for p in placements:
            files = {"MLX_HOSTFILE": hostfile} if hostfile else {}
            envs.append(RankEnv(env={"MLX_RANK": str(p.rank)}, files=files))
    elif backend == "jaccl":
        devices = json.dumps(rdma_matrix(placements))
        for p in placements:
            env = {"MLX_RANK": str(p.rank), "MLX_JACCL_COORDINATOR": f"{first_ip}:{base_port}"}
            envs.append(RankEnv(env=env, files={"MLX_IBV_DEVICES": devices}))
    else:
        for p in placements:
            env = {
                "MLX_RANK": str(p.rank),
                "MLX_WORLD_SIZE": str(world),
                "NCCL_HOST_IP": first_ip,
                "NCCL_PORT": str(base_port),
                "CUDA_VISIBLE_DEVICES": str(p.local_rank),
            }
            envs.append(RankEnv(env=env))
    return envs


def rank_file_path(run_dir: str, rank: int, variable: str) -> str:
    """Where a rank's file for `variable` lives under a run directory (local or remote)."""
    return str(PurePosixPath(run_dir) / f"rank{rank}.{variable.lower()}.json")


def host_workdir(host: HostSpec, settings: Settings) -> str:
    """The project directory on a host; relative paths start at the remote home."""
    workdir = host.workdir or settings.remote_workdir
    return workdir[2:] if workdir.startswith("~/") else workdir


def host_python(host: HostSpec, settings: Settings) -> str:
    return host.python or settings.remote_python
