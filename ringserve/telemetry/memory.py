"""Host memory, the bytes a model's weights need per rank, and the check before loading them."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ringserve.errors import MemoryCheckError

if TYPE_CHECKING:
    from ringserve.platform.device import PlatformInfo

log = logging.getLogger(__name__)

GIB = 1024**3
# Headroom beyond the weights: KV cache, activations and the runtime itself.
DEFAULT_MARGIN = 0.10


@dataclass(frozen=True)
class HostMemory:
    total: int
    available: int


def human_bytes(n_bytes: int) -> str:
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.1f} GiB"
    return f"{n_bytes / 1024**2:.1f} MiB"


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"(\w+(?:\(\w+\))?):\s+(\d+)(?:\s+(kB))?", line)
        if match:
            scale = 1024 if match.group(3) else 1
            fields[match.group(1)] = int(match.group(2)) * scale
    return fields


def host_memory_from_meminfo(text: str) -> HostMemory:
    fields = parse_meminfo(text)
    total = fields["MemTotal"]
    # Kernels before 3.14 lack MemAvailable; free + page cache is the old estimate.
    available = fields.get("MemAvailable")
    if available is None:
        available = fields.get("MemFree", 0) + fields.get("Cached", 0) + fields.get("Buffers", 0)
    return HostMemory(total=total, available=available)


def available_from_vm_stat(text: str) -> int:
    """Free, inactive and speculative pages from macOS `vm_stat`, as bytes."""
    page = re.search(r"page size of (\d+) bytes", text)
    page_size = int(page.group(1)) if page else 16384
    pages = 0
    for name in ("Pages free", "Pages inactive", "Pages speculative"):
        match = re.search(rf"^{name}:\s+(\d+)", text, re.MULTILINE)
        if match:
            pages += int(match.group(1))
    return pages * page_size


def _sysconf_memory() -> HostMemory:
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        available = total
    return HostMemory(total=total, available=available)


def _output(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=5).stdout


def _darwin_memory() -> HostMemory:
    total = int(_output("sysctl", "-n", "hw.memsize").strip())
    return HostMemory(total=total, available=available_from_vm_stat(_output("vm_stat")))


def host_memory() -> HostMemory:
    """This host's RAM: total and available to a new process."""
    try:
        if sys.platform.startswith("linux"):
            return host_memory_from_meminfo(Path("/proc/meminfo").read_text())
        if sys.platform == "darwin":
            return _darwin_memory()
    except (OSError, KeyError, ValueError, subprocess.SubprocessError) as exc:
        log.warning("reading host memory failed (%s); using sysconf", exc)
    return _sysconf_memory()


def model_weight_bytes(model_path: Path) -> int:
    """Bytes of weights in a model directory: its safetensors files, or the index's total."""
    if model_path.is_file():
        return model_path.stat().st_size
    files = sorted(model_path.glob("*.safetensors"))
    if files:
        return sum(f.stat().st_size for f in files)
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if isinstance(total, int):
            return total
    raise MemoryCheckError(f"no safetensors weights found in {model_path}")


def rank_share_bytes(total: int, world_size: int) -> int:
    """Each rank's share of the weights when they are split evenly."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    return math.ceil(total / world_size)


def check_weights_fit(
    weights: int,
    model_name: str,
    world_size: int,
    free_bytes: int,
    host_name: str,
    margin: float = DEFAULT_MARGIN,
    ranks_on_host: int = 1,
    from_budget: bool = False,
) -> None:
    """Refuse when this host's ranks need more than `free_bytes` for their share of `weights`
    bytes: one line naming the host, what is free and what is needed."""
    need = math.ceil(rank_share_bytes(weights, world_size) * ranks_on_host * (1 + margin))
    if need > free_bytes:
        ranks = f"{ranks_on_host} of {world_size} ranks" if ranks_on_host > 1 else "its rank"
        free = "budgeted by RINGSERVE_MEMORY_BUDGET" if from_budget else "free"
        raise MemoryCheckError(
            f"host {host_name} has {human_bytes(free_bytes)} {free} but needs "
            f"{human_bytes(need)} for {ranks} of {model_name} ({human_bytes(weights)} of "
            f"weights split {world_size} ways, plus {margin:.0%} headroom); free memory, "
            "add hosts, or choose a smaller model"
        )


def visible_gpu_index(cuda_visible_devices: str | None) -> int:
    """The NVML index of this process's first GPU: NVML numbers GPUs physically and ignores
    CUDA_VISIBLE_DEVICES, which the launcher sets to one index per rank."""
    first = (cuda_visible_devices or "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def free_memory_for(platform_info: PlatformInfo, budget: int = 0) -> int:
    """Bytes a rank may fill: `budget` when set, else free VRAM on CUDA, available RAM otherwise."""
    if budget > 0:
        return budget
    if platform_info.kind == "cuda":
        from ringserve.telemetry.nvml import read_gpu_report

        index = visible_gpu_index(os.environ.get("CUDA_VISIBLE_DEVICES"))
        gpu = next((g for g in read_gpu_report().gpus if g.index == index), None)
        if gpu is not None and gpu.memory_free is not None:
            return gpu.memory_free
        log.warning("free VRAM unknown (NVML gave none); assuming the GPU's total memory")
        if platform_info.memory_bytes > 0:
            return platform_info.memory_bytes
    return host_memory().available
