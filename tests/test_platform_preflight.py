from pathlib import Path

import pytest

from ringserve.cluster.hosts import rank_env, rank_placements
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import ConfigError, MemoryCheckError
from ringserve.platform.device import PlatformInfo
from ringserve.platform.preflight import (
    check_backend_environment,
    check_backend_platform,
    check_rank_memory,
    ranks_sharing_host,
)

CPU = PlatformInfo("cpu", "CPU", 8 * 1024**3, "no NVIDIA driver and no Metal on this host")
CUDA = PlatformInfo("cuda", "NVIDIA H100", 80 * 1024**3, "MLX CUDA backend available")
METAL = PlatformInfo("metal", "Apple M2 Max", 64 * 1024**3, "MLX Metal backend available")


def test_nccl_on_a_rank_without_cuda_is_refused_before_joining() -> None:
    with pytest.raises(ConfigError) as error:
        check_backend_platform("nccl", 2, CPU, "node-a")
    message = str(error.value)
    assert "RINGSERVE_BACKEND=nccl" in message and "node-a" in message
    assert "no NVIDIA driver" in message
    with pytest.raises(ConfigError, match="metal"):
        check_backend_platform("nccl", 2, METAL, "mac")


@pytest.mark.parametrize(
    ("backend", "ranks", "platform", "refused"),
    [
        ("nccl", 2, CUDA, False),
        ("nccl", 1, CPU, False),  # one rank joins no group
        ("nccl", 2, CPU, True),
        ("nccl", 2, METAL, True),
        ("ring", 2, CPU, False),
        ("jaccl", 2, METAL, False),
    ],
)
def test_only_nccl_across_ranks_needs_cuda(
    backend: str, ranks: int, platform: PlatformInfo, refused: bool
) -> None:
    try:
        check_backend_platform(backend, ranks, platform, "node-a")
    except ConfigError:
        assert refused, f"{backend} on {platform.kind} was refused"
    else:
        assert not refused, f"{backend} on {platform.kind} went ahead"


def test_an_nccl_rank_needs_the_group_s_address_in_its_environment() -> None:
    hosts = (HostSpec(host="10.0.0.1", ranks=2), HostSpec(host="10.0.0.2", ranks=2))
    placements = rank_placements(Settings(hosts=hosts, backend="nccl"), local_index=0)
    for env in rank_env(placements, "nccl", base_port=32323):
        check_backend_environment("nccl", 4, env.env)

    with pytest.raises(ConfigError, match="without MLX_WORLD_SIZE, NCCL_HOST_IP, NCCL_PORT"):
        check_backend_environment("nccl", 2, {"MLX_RANK": "0", "MLX_HOSTFILE": "/tmp/ring.json"})
    with pytest.raises(ConfigError, match="MLX_WORLD_SIZE=2 but the settings give 4"):
        check_backend_environment("nccl", 4, {**rank_env(placements[:2], "nccl", 1)[0].env})
    check_backend_environment("ring", 2, {})
    check_backend_environment("nccl", 1, {})


def test_ranks_sharing_this_host() -> None:
    assert ranks_sharing_host(Settings(local_ranks=3), {"127.0.0.1"}) == 3
    hosts = (
        HostSpec(host="10.0.0.1", ranks=2),
        HostSpec(host="node-b", ips=("10.0.0.2",), ranks=4),
    )
    settings = Settings(hosts=hosts)
    assert ranks_sharing_host(settings, {"127.0.0.1", "10.0.0.1"}) == 2
    assert ranks_sharing_host(settings, {"127.0.0.1", "10.0.0.2"}) == 4
    assert ranks_sharing_host(settings, {"127.0.0.1"}) is None


def test_a_budget_below_the_share_refuses_naming_the_host(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    settings = Settings(local_ranks=2, memory_budget=1024)
    with pytest.raises(MemoryCheckError) as error:
        check_rank_memory(settings, str(model), CPU, "node-a")
    assert "host node-a" in str(error.value)
    assert "RINGSERVE_MEMORY_BUDGET" in str(error.value)
    check_rank_memory(Settings(local_ranks=2, memory_budget=10_000), str(model), CPU, "node-a")


def test_a_model_not_on_this_host_yet_is_not_checked(tmp_path: Path) -> None:
    settings = Settings(memory_budget=1)
    here = tmp_path / "model"
    here.mkdir()
    (here / "model.safetensors").write_bytes(b"\0" * 4096)
    with pytest.raises(MemoryCheckError):  # the same budget refuses a model that is here
        check_rank_memory(settings, str(here), CPU, "node-a")
    check_rank_memory(settings, "no-such-owner/no-such-model-here", CPU, "node-a")
