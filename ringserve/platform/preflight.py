"""What a rank checks before it joins the group and loads weights, so that it fails early and
says why instead of hanging in a collective or dying for lack of memory mid-load."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ringserve.config.settings import Settings
from ringserve.distributed.layout import RankMemory, configured_budget
from ringserve.errors import ConfigError
from ringserve.platform.addresses import detect_local_host, local_addresses
from ringserve.telemetry.memory import (
    check_weights_fit,
    free_memory_for,
    human_bytes,
    model_weight_bytes,
)

if TYPE_CHECKING:
    from ringserve.platform.device import PlatformInfo

log = logging.getLogger(__name__)


def check_backend_platform(
    backend: str, world_size: int, platform: PlatformInfo, host_name: str
) -> None:
    """NCCL runs only between CUDA devices: refuse it on a rank without one, before joining."""
    if backend != "nccl" or world_size < 2 or platform.kind == "cuda":
        return
    raise ConfigError(
        f"RINGSERVE_BACKEND=nccl needs MLX CUDA on every rank, but host {host_name} runs on "
        f"{platform.kind} ({platform.reason}); use RINGSERVE_BACKEND=ring, or install the "
        "CUDA build of MLX there (RINGSERVE_MLX_BUILD, scripts/setup.sh)"
    )


# What MLX's nccl backend reads to join a group (`mlx.launch --backend nccl` sets the same).
NCCL_VARIABLES = ("MLX_RANK", "MLX_WORLD_SIZE", "NCCL_HOST_IP", "NCCL_PORT")


def check_backend_environment(backend: str, world_size: int, environ: Mapping[str, str]) -> None:
    """Refuse to join an nccl group this rank was not given the address of."""
    if backend != "nccl" or world_size < 2:
        return
    missing = [name for name in NCCL_VARIABLES if not environ.get(name)]
    if missing:
        raise ConfigError(
            f"RINGSERVE_BACKEND=nccl: this rank was started without {', '.join(missing)}, "
            "which MLX needs to join the group; start the ranks with `launch.py start` or "
            "`mlx.launch --backend nccl`"
        )
    if environ["MLX_WORLD_SIZE"] != str(world_size):
        raise ConfigError(
            f"RINGSERVE_BACKEND=nccl: MLX_WORLD_SIZE={environ['MLX_WORLD_SIZE']} but the "
            f"settings give {world_size} ranks"
        )


def own_memory(settings: Settings, platform: PlatformInfo) -> RankMemory:
    """What this rank tells the others of its memory, for the layout and a pipeline's split."""
    host_index = 0
    if settings.hosts:
        try:
            host_index = detect_local_host(settings.hosts, local_addresses())
        except ConfigError:
            log.warning("this host is not in RINGSERVE_HOSTS; its budget is its own free memory")
            host_index = -1
    return RankMemory(host_index, free_memory_for(platform), platform.kind == "cuda")


def host_budget(settings: Settings, addresses: set[str]) -> int | tuple[int, ...]:
    """This host's configured budget: one number for its ranks (each GPU's own on CUDA), one
    per rank, or 0 (none: what is free is measured)."""
    host_index = 0
    if settings.hosts:
        try:
            host_index = detect_local_host(settings.hosts, addresses)
        except ConfigError:
            return settings.memory_budget
    return configured_budget(settings, host_index)


def host_weight_room(settings: Settings, platform: PlatformInfo) -> int:
    """Bytes this host's ranks may hold in weights together: its budget, else what is free
    (on CUDA each rank has a GPU of its own, taken as alike)."""
    addresses = local_addresses()
    budget = host_budget(settings, addresses)
    if isinstance(budget, tuple):
        return sum(budget)
    free = free_memory_for(platform, budget)
    ranks_here = ranks_sharing_host(settings, addresses) or 1
    return free * ranks_here if platform.kind == "cuda" else free


def ranks_sharing_host(settings: Settings, addresses: set[str]) -> int | None:
    """How many ranks run on this machine (they share its memory); None when it is unknown."""
    if not settings.hosts:
        return settings.world_size
    try:
        return settings.hosts[detect_local_host(settings.hosts, addresses)].ranks
    except ConfigError:
        return None


def local_weights(model: str) -> Path | None:
    """The directory holding the model's weights on this machine, if they are here already."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
            )
        )
    except Exception as exc:  # not in the cache, or not a repo id at all
        log.debug("no local copy of %s: %s", model, exc)
        return None


def check_rank_memory(
    settings: Settings, model: str, platform: PlatformInfo, host_name: str
) -> None:
    """Raise MemoryCheckError when this host's ranks would not fit their share of the weights."""
    weights = local_weights(model)
    if weights is None:
        log.warning("memory check skipped: %s is not on this host yet (mlx-lm fetches it)", model)
        return
    check_host_memory(settings, model_weight_bytes(weights), weights.name, platform, host_name)


@dataclass(frozen=True)
class HostMemory:
    """This host's memory for weights: what its ranks may fill together (their budget, else
    what is free; one GPU's on CUDA) for the even share a tensor split gives each, and what
    each rank's device has free, from which the ranks' budgets for a pipeline's split follow."""

    free: int
    ranks_here: int
    from_budget: bool
    device_free: int
    own_device: bool


def host_memory(settings: Settings, platform: PlatformInfo) -> HostMemory:
    # CUDA ranks each get a GPU of their own (CUDA_VISIBLE_DEVICES); elsewhere they share RAM.
    ranks_here = 1 if platform.kind == "cuda" else ranks_sharing_host(settings, local_addresses())
    if ranks_here is None:
        log.warning("this host is not in RINGSERVE_HOSTS; checking memory for one rank")
        ranks_here = 1
    budget = host_budget(settings, local_addresses())
    if isinstance(budget, tuple):
        # One per rank: each CUDA rank's own GPU (the smallest must hold a share), else the
        # host's RAM they share.
        budget = min(budget) if platform.kind == "cuda" else sum(budget)
    return HostMemory(
        free=free_memory_for(platform, budget),
        ranks_here=ranks_here,
        from_budget=budget > 0,
        device_free=free_memory_for(platform),
        own_device=platform.kind == "cuda",
    )


def check_memory_fits(
    memory: HostMemory, settings: Settings, weight_bytes: int, model_name: str, host_name: str
) -> None:
    """Raise MemoryCheckError when the host's ranks would not fit their even share of
    `weight_bytes` (the sizes of the model's safetensors files, read before any weight)."""
    check_weights_fit(
        weight_bytes,
        model_name,
        settings.world_size,
        memory.free,
        host_name,
        ranks_on_host=memory.ranks_here,
        from_budget=memory.from_budget,
    )


def check_host_memory(
    settings: Settings, weight_bytes: int, model_name: str, platform: PlatformInfo, host_name: str
) -> None:
    """Raise MemoryCheckError when this host's ranks would not fit their share of
    `weight_bytes` (the sizes of the model's safetensors files, read before any weight)."""
    memory = host_memory(settings, platform)
    check_memory_fits(memory, settings, weight_bytes, model_name, host_name)
    log.info(
        "memory check passed on %s: %s free for %d rank(s) here",
        host_name,
        human_bytes(memory.free),
        memory.ranks_here,
    )
