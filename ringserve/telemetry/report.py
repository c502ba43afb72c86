"""One rank's telemetry: what it runs on and how its memory and GPUs stand right now."""

from __future__ import annotations

import importlib.metadata
import os
import socket

from pydantic import BaseModel, ConfigDict

from ringserve.platform.blas import CpuBlas, current_cpu_blas
from ringserve.platform.cpu_share import describe_cpus
from ringserve.platform.device import PlatformInfo, PlatformKind, current_platform, describe
from ringserve.telemetry.memory import host_memory
from ringserve.telemetry.nvml import GpuInfo, GpuReport, read_gpu_report


class RankTelemetry(BaseModel):
    """Gathered from every rank in a telemetry tick; travels as JSON (`rank_report`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int
    hostname: str
    pid: int
    platform: PlatformKind
    device: str
    host_memory_total: int
    host_memory_available: int
    gpus: tuple[GpuInfo, ...] = ()
    gpu_reason: str | None = None
    gpu_driver_version: str | None = None
    cuda_driver_version: str | None = None
    mlx_version: str
    cpus: str | None = None  # the CPUs this rank may run on, as Linux writes lists ("0-3")
    cpu_blas: CpuBlas | None = None  # the BLAS the process maps (Linux), and its threads


def collect_rank_telemetry(rank: int, platform: PlatformInfo | None = None) -> RankTelemetry:
    """Read this rank's telemetry; cheap enough to run between requests.

    The platform is detected once per process; NVML is asked only where a GPU may be.
    """
    platform = platform or current_platform()
    on_metal = platform.kind == "metal"
    gpus = GpuReport(reason="Apple GPU: no NVML") if on_metal else read_gpu_report()
    memory = host_memory()
    return RankTelemetry(
        rank=rank,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        platform=platform.kind,
        device=describe(platform),
        host_memory_total=memory.total,
        host_memory_available=memory.available,
        gpus=gpus.gpus,
        gpu_reason=gpus.reason,
        gpu_driver_version=gpus.driver_version,
        cuda_driver_version=gpus.cuda_driver_version,
        mlx_version=importlib.metadata.version("mlx"),
        cpus=describe_cpus(sorted(os.sched_getaffinity(0)))
        if hasattr(os, "sched_getaffinity")
        else None,
        cpu_blas=current_cpu_blas(),
    )
