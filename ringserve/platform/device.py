"""Which device this rank computes on (Metal, CUDA or CPU), and the settings that go with it.

`probe_platform` gathers raw observations (MLX backends, NVML, the NVIDIA driver); the pure
`platform_from_probe` decides. A GPU MLX cannot use falls back to CPU with a warning.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ringserve.platform.mlx_build import build_for_driver, nvidia_driver_version
from ringserve.platform.process_env import PlatformKind, installed_mlx_cuda
from ringserve.telemetry.memory import GIB, host_memory
from ringserve.telemetry.nvml import GpuInfo, read_gpu_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlatformInfo:
    kind: PlatformKind
    device_name: str
    memory_bytes: int
    reason: str
    warning: str | None = None


@dataclass(frozen=True)
class Probe:
    """What this process observed about its devices; no decision yet."""

    metal_available: bool = False
    cuda_available: bool = False
    cuda_error: str | None = None
    mlx_cuda_package: str | None = None
    device_info: Mapping[str, Any] = field(default_factory=dict)
    gpu: GpuInfo | None = None
    nvml_reason: str | None = None
    nvidia_driver: str | None = None
    host_memory_total: int = 0
    os_name: str = sys.platform


def _gpu_build_hint(driver: str) -> str:
    build = build_for_driver(driver)
    if build == "cpu":
        return f"NVIDIA driver {driver} is too old for MLX's CUDA builds"
    return (
        f"NVIDIA driver {driver} found but this MLX build has no CUDA backend "
        f"(install mlx[{build}]: RINGSERVE_MLX_BUILD={build} scripts/setup.sh)"
    )


def _cpu_reason(probe: Probe) -> tuple[str, str | None]:
    """Why this rank runs on CPU, and a warning when a GPU is there but unused."""
    package = probe.mlx_cuda_package
    if package and (probe.nvidia_driver or probe.gpu is not None):
        detail = probe.cuda_error or "mx.cuda.is_available() is False"
        reason = f"NVIDIA GPU present but {package} cannot use it: {detail}"
        return reason, reason
    if package:
        reason = f"{package} is installed but no NVIDIA driver was found"
        return reason, reason
    if probe.nvidia_driver:
        reason = _gpu_build_hint(probe.nvidia_driver)
        return reason, reason
    if probe.os_name == "darwin":
        return "MLX Metal backend not available", "MLX Metal backend not available on macOS"
    return "no NVIDIA driver and no Metal on this host", None


def platform_from_probe(probe: Probe) -> PlatformInfo:
    info = probe.device_info
    if probe.metal_available:
        return PlatformInfo(
            kind="metal",
            device_name=str(info.get("device_name") or "Apple GPU"),
            memory_bytes=int(info.get("memory_size") or 0),
            reason="MLX Metal backend available",
        )
    if probe.cuda_available:
        warning = None
        if probe.gpu is not None and probe.gpu.name:
            name, memory = probe.gpu.name, probe.gpu.memory_total or 0
        else:
            name = str(info.get("device_name") or "NVIDIA GPU")
            memory = int(info.get("memory_size") or info.get("total_memory") or 0)
            warning = f"{probe.nvml_reason or 'NVML gave no GPU'}; GPU telemetry is unavailable"
        return PlatformInfo("cuda", name, memory, "MLX CUDA backend available", warning)
    reason, warning = _cpu_reason(probe)
    return PlatformInfo(
        kind="cpu",
        device_name=str(info.get("device_name") or "CPU"),
        memory_bytes=probe.host_memory_total,
        reason=reason,
        warning=warning,
    )


def _ask_bool(question: Callable[[], Any]) -> tuple[bool, str | None]:
    try:
        return bool(question()), None
    except Exception as exc:  # a backend that fails to start must not stop the rank
        return False, f"{type(exc).__name__}: {exc}"


def probe_platform() -> Probe:
    metal, _ = _ask_bool(mx.metal.is_available)
    cuda_is_available = getattr(getattr(mx, "cuda", None), "is_available", None)
    cuda, cuda_error = _ask_bool(cuda_is_available) if cuda_is_available else (False, None)
    try:
        device_info: Mapping[str, Any] = dict(mx.device_info())
    except Exception as exc:
        log.debug("mx.device_info() failed: %s", exc)
        device_info = {}
    driver = None if metal else nvidia_driver_version()
    gpu, nvml_reason = None, None
    if cuda or driver:
        report = read_gpu_report()
        gpu, nvml_reason = (report.gpus[0] if report.gpus else None), report.reason
    return Probe(
        metal_available=metal,
        cuda_available=cuda,
        cuda_error=cuda_error,
        mlx_cuda_package=installed_mlx_cuda(),
        device_info=device_info,
        gpu=gpu,
        nvml_reason=nvml_reason,
        nvidia_driver=driver,
        host_memory_total=host_memory().total,
    )


def detect_platform() -> PlatformInfo:
    """Probe this process's devices, decide, and log the decision."""
    info = platform_from_probe(probe_platform())
    if info.warning:
        log.warning("%s%s", info.warning, "; running on CPU" if info.kind == "cpu" else "")
    log.info("%s", describe(info))
    return info


@functools.cache
def current_platform() -> PlatformInfo:
    """`detect_platform` once per process."""
    return detect_platform()


def describe(info: PlatformInfo) -> str:
    memory = f"{info.memory_bytes / GIB:.1f} GiB" if info.memory_bytes else "memory unknown"
    if info.kind == "cuda":
        return f"GPU: {info.device_name} ({memory}) via MLX CUDA"
    if info.kind == "metal":
        return f"GPU: {info.device_name} ({memory} unified) via MLX Metal"
    return f"no GPU: running on CPU ({info.reason})"


# --- what a rank's process needs around the platform --------------------------------------------


def apply_wired_limit(info: PlatformInfo) -> int | None:
    """On Metal, wire the recommended working set so weights stay resident; else do nothing.

    Returns the previous limit, or None when nothing was changed.
    """
    if info.kind != "metal":
        return None
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    return maybe_set_recommended_wired_limit()


# --- MLX functions mlx_lm calls that some MLX builds lack -----------------------------------------


def _device_info_fallback(namespace: Any) -> Callable[[], Any]:
    metal = getattr(namespace, "metal", None)
    if metal is not None and hasattr(metal, "device_info"):
        return metal.device_info
    return dict


def _thread_local_stream_fallback(namespace: Any) -> Callable[[Any], Any]:
    # A plain stream: correct for one generating thread, which is how a rank generates.
    return namespace.new_stream


# mlx_lm.generate calls new_thread_local_stream at import, and device_info when it sets the
# wired limit; builds older than mlx_lm expects (seen with CUDA wheels) lack them.
_SHIMS: dict[str, Callable[[Any], Callable[..., Any]]] = {
    "new_thread_local_stream": _thread_local_stream_fallback,
    "device_info": _device_info_fallback,
}


def install_mlx_shims(namespace: Any = mx) -> list[str]:
    """Add the functions mlx_lm needs that `namespace` (mlx.core) lacks; return their names.

    Call before importing `mlx_lm.generate`. A function already present is left alone.
    """
    added = []
    for name, fallback in _SHIMS.items():
        if not hasattr(namespace, name):
            setattr(namespace, name, fallback(namespace))
            added.append(name)
    if added:
        log.info("MLX lacks %s; using fallbacks", ", ".join(added))
    return added


def use_device(info: PlatformInfo) -> None:
    """Compute where `info` says: a rank that falls back to CPU must not keep a GPU default.

    Call before importing `mlx_lm.generate`, which makes its stream on the default device.
    """
    if info.kind != "cpu":
        return
    try:
        on_cpu = mx.default_device() == mx.cpu
    except Exception as exc:  # a broken GPU backend may fail even this question
        log.debug("mx.default_device() failed: %s", exc)
        on_cpu = False
    if not on_cpu:
        mx.set_default_device(mx.cpu)
        log.info("MLX default device set to the CPU")
