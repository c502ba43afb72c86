"""The BLAS that MLX's CPU build computes with on Linux: MKL from its wheel, else the bundled one.

The `mlx[cpu]` wheel links the reference BLAS (one thread, no SIMD kernels), a small fraction of
what the machine can do. Python loads `libmlx.so` with RTLD_LOCAL, and the dynamic loader looks
its BLAS and LAPACK symbols (`cblas_sgemm`, `sgetrf_`) up in the global scope before it looks in
libmlx's own dependencies. So MKL, loaded with RTLD_GLOBAL before anything imports `mlx.core`,
is what MLX calls: no LD_PRELOAD, no restart, nothing in the environment for child processes.

What a process really computes with is read back from /proc/self/maps, never assumed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ringserve.config.settings import Settings
from ringserve.platform.addresses import local_addresses
from ringserve.platform.mlx_build import BUILD_PACKAGES
from ringserve.platform.preflight import ranks_sharing_host

log = logging.getLogger(__name__)

MKL_DISTRIBUTION = "mkl"
# The machines PyPI has MKL wheels for (pyproject.toml's `cpu` extra installs it there).
MKL_MACHINES = ("x86_64",)
SETTING = "RINGSERVE_CPU_BLAS"


@dataclass(frozen=True)
class KnownBlas:
    name: str
    file: re.Pattern[str]
    threads_function: str | None  # exported function giving its thread count; None: one thread


MKL = KnownBlas("MKL", re.compile(r"libmkl_rt\.so(\.\d+)*"), "MKL_Get_Max_Threads")
# In order of preference when several are mapped: the bundled one is always there beside MKL.
KNOWN_BLAS = (
    MKL,
    KnownBlas("OpenBLAS", re.compile(r"libopenblas.*\.so(\.\d+)*"), "openblas_get_num_threads"),
    KnownBlas("MLX's bundled reference BLAS", re.compile(r"libblas-[0-9a-f]+\.so(\.\d+)*"), None),
)


class CpuBlas(BaseModel):
    """The BLAS a process has mapped, and how many threads it computes with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    library: str  # the mapped file
    optimized: bool
    threads: int | None = None


def mapped_files(maps_text: str) -> list[str]:
    """The files in /proc/PID/maps, each once, in the order they first appear."""
    files: dict[str, None] = {}
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.setdefault(fields[5], None)
    return list(files)


def blas_in_maps(maps_text: str) -> tuple[KnownBlas, str] | None:
    """The preferred known BLAS among the mapped files, and its file."""
    files = mapped_files(maps_text)
    for known in KNOWN_BLAS:
        for file in files:
            if known.file.fullmatch(Path(file).name):
                return known, file
    return None


def blas_threads(cpus: int, ranks_sharing: int) -> int:
    """BLAS threads for a process that may run on `cpus` CPUs shared by `ranks_sharing` ranks:
    its share of them, never fewer than one."""
    return max(1, cpus // max(1, ranks_sharing))


def cpus_allowed() -> int:
    """How many CPUs this process may run on (its slice, when it was pinned to one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_wanted(choice: str, os_name: str, cpu_build: bool) -> bool:
    """Whether MLX should compute with MKL: the CPU build on Linux, unless told `bundled`.
    Metal and CUDA builds compute elsewhere."""
    return choice == "auto" and os_name.startswith("linux") and cpu_build


def missing_mkl(machine: str) -> str:
    """Why a process that wants MKL computes with the bundled BLAS, and how to fix it."""
    if machine not in MKL_MACHINES:
        return f"PyPI has no MKL for {machine}"
    return (
        f"MKL is not installed for this Python; scripts/setup.sh installs it "
        f"(pip install {MKL_DISTRIBUTION}), or set {SETTING}=bundled"
    )


def cpu_build_installed() -> bool:
    try:
        importlib.metadata.version(BUILD_PACKAGES["cpu"])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def mkl_library() -> Path | None:
    """MKL's single dynamic library, where the `mkl` wheel installed it."""
    try:
        dist = importlib.metadata.distribution(MKL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if MKL.file.fullmatch(file.name):
            return Path(str(dist.locate_file(file))).resolve()
    return None


def load_cpu_blas(choice: str, threads: int) -> str | None:
    """Load MKL for MLX, with `threads` threads; call it before anything imports `mlx.core`.

    Returns why MLX keeps its bundled BLAS when it should not have to (None: MKL is loaded, or
    this process needs none). Never raises: a rank computes with the bundled BLAS rather than
    not start.
    """
    if not blas_wanted(choice, sys.platform, cpu_build_installed()):
        return None
    if "mlx.core" in sys.modules:
        return "MLX was imported before MKL could be loaded"
    library = mkl_library()
    if library is None:
        return missing_mkl(platform.machine())
    try:
        mkl = ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
        mkl.MKL_Set_Num_Threads(ctypes.c_int(threads))
    except (OSError, AttributeError) as exc:
        return f"MKL did not load from {library} ({exc})"
    return None


def current_cpu_blas() -> CpuBlas | None:
    """The BLAS this process has mapped (after MLX is imported), with its thread count as the
    library itself reports it. None where there is no /proc (macOS) or no BLAS is mapped."""
    try:
        with open("/proc/self/maps") as maps:
            found = blas_in_maps(maps.read())
    except OSError:
        return None
    if found is None:
        return None
    known, file = found
    threads: int | None = 1
    if known.threads_function is not None:
        try:
            threads = int(getattr(ctypes.CDLL(file), known.threads_function)())
        except (OSError, AttributeError):
            threads = None
    return CpuBlas(
        name=known.name, library=file, optimized=known.threads_function is not None, threads=threads
    )


def blas_summary(blas: CpuBlas) -> str:
    """Its name and thread count: "MKL, 2 threads"."""
    n = blas.threads
    return f"{blas.name}, " + ("threads unknown" if n is None else f"{n} thread{'s' * (n != 1)}")


def rank_blas_threads(settings: Settings, own_cpus: bool) -> int:
    """A rank's BLAS threads: every CPU of its own slice; without one, its share of the CPUs it
    may run on among the ranks of this host."""
    sharing = 1 if own_cpus else ranks_sharing_host(settings, local_addresses()) or 1
    return blas_threads(cpus_allowed(), sharing)


def cpu_blas_line(choice: str, problem: str | None) -> tuple[str, bool] | None:
    """The line naming the BLAS this process computes with, as mapped, and whether it is a
    warning (the bundled one where MKL was wanted). Call it after `mlx.core` is imported."""
    blas = current_cpu_blas()
    if blas is None:
        return None
    wanted = blas_wanted(choice, sys.platform, cpu_build_installed())
    if problem is None and wanted and not blas.optimized:
        problem = "MKL was loaded but this process does not map it"
    line = f"CPU BLAS: {blas_summary(blas)} ({blas.library})"
    if problem is not None:
        return f"{line}: {problem}", True
    told = f", as {SETTING}=bundled asks" if choice == "bundled" and not blas.optimized else ""
    return line + told, False


def log_cpu_blas(choice: str, problem: str | None) -> None:
    """Log `cpu_blas_line`: one line, a warning when MLX computes with its bundled BLAS where
    MKL was wanted."""
    found = cpu_blas_line(choice, problem)
    if found is not None:
        line, warning = found
        log.log(logging.WARNING if warning else logging.INFO, "%s", line)
