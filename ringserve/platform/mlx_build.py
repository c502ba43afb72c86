"""Which MLX build suits this machine: Metal, CUDA 12, CUDA 13 or CPU.

Standard library only: scripts/setup.sh runs this through scripts/pick_mlx_build.py with the
system Python, before the project's virtual environment exists.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

CHOICES = ("cpu", "cuda12", "cuda13", "metal")
VARIABLE = "RINGSERVE_MLX_BUILD"
# The oldest Linux drivers that run CUDA 13 and CUDA 12 toolkits' code.
CUDA13_MIN_DRIVER = 580
CUDA12_MIN_DRIVER = 525

_PROC_VERSION = Path("/proc/driver/nvidia/version")


class BuildChoiceError(ValueError):
    """RINGSERVE_MLX_BUILD names no known build."""


def driver_version_from_proc(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version ("... Kernel Module  550.54.15  ...")."""
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def driver_version_from_smi(text: str) -> str | None:
    """The first version `nvidia-smi --query-gpu=driver_version --format=csv,noheader` prints."""
    match = re.search(r"^\s*(\d+\.\d+(?:\.\d+)?)\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def build_for_driver(driver_version: str | None) -> str:
    """The MLX build for a Linux host with this NVIDIA driver (None: no driver)."""
    if not driver_version:
        return "cpu"
    match = re.match(r"\s*(\d+)", driver_version)
    if match is None:
        return "cpu"
    major = int(match.group(1))
    if major >= CUDA13_MIN_DRIVER:
        return "cuda13"
    if major >= CUDA12_MIN_DRIVER:
        return "cuda12"
    return "cpu"


def forced_build(environ: Mapping[str, str], dotenv_text: str = "") -> str | None:
    """The build RINGSERVE_MLX_BUILD forces (the environment wins over `.env`); None for auto."""
    value = environ.get(VARIABLE)
    if value is None:
        value = _dotenv_value(dotenv_text, VARIABLE)
    value = (value or "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in CHOICES:
        raise BuildChoiceError(f"{VARIABLE}={value!r} is invalid: use auto or one of {CHOICES}")
    return value


def _dotenv_value(text: str, name: str) -> str | None:
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            value = value.split(" #", 1)[0].strip()
            found = value.strip("'\"")
    return found


def nvidia_driver_version() -> str | None:
    """The installed NVIDIA driver's version, or None when this host has none."""
    try:
        version = driver_version_from_proc(_PROC_VERSION.read_text())
    except OSError:
        version = None
    if version:
        return version
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return driver_version_from_smi(result.stdout) if result.returncode == 0 else None


def pick_build(environ: Mapping[str, str], dotenv_text: str = "") -> str:
    forced = forced_build(environ, dotenv_text)
    if forced is not None:
        return forced
    if platform.system() == "Darwin":
        return "metal"
    if platform.system() == "Linux":
        return build_for_driver(nvidia_driver_version())
    return "cpu"


def pick_build_for_project(project_dir: Path) -> str:
    env_file = project_dir / ".env"
    text = env_file.read_text() if env_file.is_file() else ""
    return pick_build(os.environ, text)


# The package each build adds to `mlx`. They all install the same mlx/lib/libmlx.so, so one
# installed over another leaves a library pip no longer tracks correctly.
BUILD_PACKAGES = {
    "cpu": "mlx-cpu",
    "cuda12": "mlx-cuda-12",
    "cuda13": "mlx-cuda-13",
    "metal": "mlx-metal",
}


def packages_to_remove(chosen: str, installed: Iterable[str]) -> list[str]:
    """The MLX packages to uninstall before installing the `chosen` build: none when no other
    build is installed, else all of them (with `mlx` itself), so the chosen one installs whole."""
    installed = {name.lower() for name in installed}
    others = [BUILD_PACKAGES[b] for b in CHOICES if b != chosen and b != "metal"]
    if not installed & set(others):
        return []
    return [name for name in ("mlx", *BUILD_PACKAGES.values()) if name in installed]


def installed_packages() -> list[str]:
    """Names of the distributions installed for the running Python."""
    return [dist.metadata["Name"] for dist in importlib.metadata.distributions()]
