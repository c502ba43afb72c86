import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringserve.platform.mlx_build import (
    BuildChoiceError,
    build_for_driver,
    driver_version_from_proc,
    driver_version_from_smi,
    forced_build,
    installed_packages,
    packages_to_remove,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pick_mlx_build.py"

PROC_VERSION = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
)
PROC_VERSION_OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:17 UTC 2025\n"
)


@pytest.mark.parametrize(
    ("driver", "build"),
    [
        (None, "cpu"),
        ("", "cpu"),
        ("470.256.02", "cpu"),
        ("524.99", "cpu"),
        ("525.60.13", "cuda12"),
        ("550.54.15", "cuda12"),
        ("575.57.08", "cuda12"),
        ("580.65.06", "cuda13"),
        ("590.44.01", "cuda13"),
        ("not a version", "cpu"),
    ],
)
def test_driver_version_picks_the_build(driver: str | None, build: str) -> None:
    assert build_for_driver(driver) == build


def test_driver_version_is_read_from_proc_and_nvidia_smi() -> None:
    assert driver_version_from_proc(PROC_VERSION) == "550.54.15"
    assert driver_version_from_proc(PROC_VERSION_OPEN) == "580.65.06"
    assert driver_version_from_proc("") is None
    assert driver_version_from_smi("580.65.06\n580.65.06\n") == "580.65.06"
    assert driver_version_from_smi("NVIDIA-SMI has failed\n") is None


def test_the_environment_overrides_dotenv_and_auto_means_no_override() -> None:
    dotenv = "# build\nRINGSERVE_MLX_BUILD='cuda12'  # forced\n"
    assert forced_build({}, dotenv) == "cuda12"
    assert forced_build({"RINGSERVE_MLX_BUILD": "CPU"}, dotenv) == "cpu"
    assert forced_build({"RINGSERVE_MLX_BUILD": "auto"}, dotenv) is None
    assert forced_build({}, "") is None
    with pytest.raises(BuildChoiceError, match="RINGSERVE_MLX_BUILD='rocm' is invalid"):
        forced_build({"RINGSERVE_MLX_BUILD": "rocm"})


def test_the_setup_script_prints_the_forced_build() -> None:
    env = {**os.environ, "RINGSERVE_MLX_BUILD": "cuda13"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout == "cuda13\n"


def test_switching_builds_removes_every_mlx_package_first() -> None:
    # What `pip list` showed after installing mlx[cpu] over mlx[cuda13] into one environment.
    both = ["mlx", "mlx-cpu", "mlx-cuda-13", "mlx-lm", "nvidia-cublas"]
    assert packages_to_remove("cpu", both) == ["mlx", "mlx-cpu", "mlx-cuda-13"]
    assert packages_to_remove("cuda13", ["mlx", "mlx-cpu"]) == ["mlx", "mlx-cpu"]


def test_the_same_build_again_removes_nothing() -> None:
    assert packages_to_remove("cpu", ["mlx", "mlx-cpu", "mlx-lm"]) == []
    assert packages_to_remove("cuda12", []) == []


@pytest.mark.skipif(
    "mlx-cpu" not in {name.lower() for name in installed_packages()},
    reason="this environment has no CPU build of MLX",
)
def test_the_setup_script_lists_what_this_environment_must_lose() -> None:
    # This environment has the CPU build: switching to CUDA 13 removes it, staying keeps it.
    for build, stale in (("cuda13", "mlx mlx-cpu\n"), ("cpu", "\n")):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--stale", build],
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout == stale
