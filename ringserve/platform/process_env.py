"""The environment a rank's process needs for its platform, decided before MLX is imported.

Nothing here imports MLX: `server.py` runs it first, because some of these variables only
work when they are in place before MLX loads (LD_LIBRARY_PATH for CUDA's libraries is read by
the dynamic loader at process start; MLX_METAL_FAST_SYNCH before Metal initialises).
"""

from __future__ import annotations

import importlib.metadata
import os
import site
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from ringserve.errors import MlxUnavailableError
from ringserve.platform.mlx_build import (
    BUILD_PACKAGES,
    build_for_driver,
    nvidia_driver_version,
)

PlatformKind = Literal["metal", "cuda", "cpu"]

# Set on the restarted process so that it never restarts itself again. Not RINGSERVE_-prefixed:
# settings refuse unknown RINGSERVE_ variables.
RELAUNCH_MARKER = "_RINGSERVE_RELAUNCHED"


def nvidia_library_dirs(site_packages: Iterable[Path]) -> list[Path]:
    """The `nvidia/*/lib` directories that NVIDIA's pip wheels install, in search order."""
    found: list[Path] = []
    for root in site_packages:
        for lib in sorted(Path(root).glob("nvidia/*/lib")):
            if lib.is_dir() and lib not in found:
                found.append(lib)
    return found


def library_path(dirs: Iterable[Path], existing: str = "") -> str:
    parts: list[str] = []
    for part in [*(str(d) for d in dirs), *existing.split(os.pathsep)]:
        if part and part not in parts:
            parts.append(part)
    return os.pathsep.join(parts)


def python_site_dirs() -> list[Path]:
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(p) for p in roots]


def installed_mlx_cuda() -> str | None:
    """The installed MLX CUDA package and its version, e.g. "mlx-cuda-12 0.32.4"."""
    for name in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def expected_kind(os_name: str, mlx_cuda_package: str | None) -> PlatformKind:
    """The platform this process will most likely run on, guessed without importing MLX.

    Only used to prepare the environment; `platform.detect_platform` decides for real later.
    """
    if os_name == "darwin":
        return "metal"
    if os_name.startswith("linux") and mlx_cuda_package:
        return "cuda"
    return "cpu"


def rank_environment(
    kind: PlatformKind,
    site_packages: Iterable[Path] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment variables a rank's process should get on this platform."""
    if kind == "metal":
        return {"MLX_METAL_FAST_SYNCH": "1"}
    if kind == "cuda":
        environ = os.environ if environ is None else environ
        roots = python_site_dirs() if site_packages is None else site_packages
        dirs = nvidia_library_dirs(roots)
        if dirs:
            return {"LD_LIBRARY_PATH": library_path(dirs, environ.get("LD_LIBRARY_PATH", ""))}
    return {}


def _holds(environ: Mapping[str, str], name: str, value: str) -> bool:
    current = environ.get(name)
    if current is None:
        return False
    if name.endswith("PATH"):
        return set(value.split(os.pathsep)) <= set(current.split(os.pathsep))
    return current == value


def relaunch_environment(
    environ: Mapping[str, str], wanted: Mapping[str, str]
) -> dict[str, str] | None:
    """The environment to restart this process with so that it holds `wanted`, or None.

    None when nothing is missing, or when this process is already the restarted one.
    """
    missing = {k: v for k, v in wanted.items() if not _holds(environ, k, v)}
    if not missing or environ.get(RELAUNCH_MARKER):
        return None
    return {**environ, **missing, RELAUNCH_MARKER: "1"}


def prepare_process_environment() -> None:
    """Give this process its platform's environment; restart it once when the loader needs it.

    On CUDA the NVIDIA wheels' `lib` directories must be on LD_LIBRARY_PATH when the process
    starts, so a process that lacks them is replaced (same PID, same argv) by one that has
    them. Metal's variables only need to be set before MLX is imported; a value the user set
    is kept.
    """
    kind = expected_kind(sys.platform, installed_mlx_cuda())
    wanted = rank_environment(kind)
    if kind == "cuda":
        env = relaunch_environment(os.environ, wanted)
        if env is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, env)
        return
    for name, value in wanted.items():
        os.environ.setdefault(name, value)


def mlx_import_problem(error: ImportError, mlx_cuda_package: str | None, driver: str | None) -> str:
    """What to tell the user when `import mlx.core` fails, and how to fix it.

    A CUDA build cannot fall back to the CPU: without a driver (no `libcuda.so.1`), or with one
    too old for its CUDA runtime, MLX itself fails to load.
    """
    if not mlx_cuda_package:
        return f"MLX cannot load ({error}); reinstall it with scripts/setup.sh"
    host = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver"
    problem = f"MLX cannot load: {mlx_cuda_package} is installed and this host has {host} ({error})"
    fits = build_for_driver(driver)
    if mlx_cuda_package.startswith(BUILD_PACKAGES[fits] + " "):
        return f"{problem}; reinstall it with scripts/setup.sh"
    other_fix = "update the driver" if driver else "install the driver"
    return (
        f"{problem}. Either {other_fix}, or switch this host to the build its driver runs: "
        f"RINGSERVE_MLX_BUILD={fits} scripts/setup.sh"
    )


def require_mlx() -> None:
    """Import MLX once, turning a failure into a clear error instead of a traceback."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        problem = mlx_import_problem(exc, installed_mlx_cuda(), nvidia_driver_version())
        raise MlxUnavailableError(problem) from exc
