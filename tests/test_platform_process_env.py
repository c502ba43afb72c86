import os
import subprocess
import sys
from pathlib import Path

from ringserve.platform.process_env import (
    RELAUNCH_MARKER,
    expected_kind,
    mlx_import_problem,
    rank_environment,
    relaunch_environment,
)

PROJECT_DIR = Path(__file__).resolve().parents[1]


def test_the_platform_is_guessed_before_mlx_loads() -> None:
    assert expected_kind("darwin", None) == "metal"
    assert expected_kind("linux", "mlx-cuda-12 0.32.4") == "cuda"
    assert expected_kind("linux", None) == "cpu"
    assert expected_kind("win32", "mlx-cuda-12 0.32.4") == "cpu"


def test_a_cuda_rank_without_the_wheel_libraries_restarts_once(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    for lib in ("cublas/lib", "nccl/lib"):
        (site / "nvidia" / lib).mkdir(parents=True)
    environ = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x/lib"}
    wanted = rank_environment("cuda", site_packages=[site], environ=environ)

    restart = relaunch_environment(environ, wanted)
    assert restart is not None
    assert restart["PATH"] == "/usr/bin"
    parts = restart["LD_LIBRARY_PATH"].split(os.pathsep)
    assert parts == [str(site / "nvidia/cublas/lib"), str(site / "nvidia/nccl/lib"), "/opt/x/lib"]
    assert restart[RELAUNCH_MARKER] == "1"

    # The restarted process has what it wanted, so it goes on.
    assert relaunch_environment(restart, wanted) is None


def test_a_process_that_already_has_the_libraries_does_not_restart(tmp_path: Path) -> None:
    lib = tmp_path / "nvidia" / "cublas" / "lib"
    lib.mkdir(parents=True)
    environ = {"LD_LIBRARY_PATH": f"/opt/x/lib{os.pathsep}{lib}"}
    wanted = rank_environment("cuda", site_packages=[tmp_path], environ=environ)
    assert relaunch_environment(environ, wanted) is None
    assert relaunch_environment({}, {}) is None


def test_the_marker_stops_a_restart_loop() -> None:
    environ = {RELAUNCH_MARKER: "1"}
    assert relaunch_environment(environ, {"LD_LIBRARY_PATH": "/never/there"}) is None


def test_the_rank_entry_point_installs_the_shims_before_mlx_lm_generate() -> None:
    # server.py must import nothing that pulls mlx_lm in before the shims are installed.
    code = (
        "import sys; sys.argv = ['server.py'];"
        "import server;"
        "assert 'mlx_lm' not in sys.modules, 'server.py imports mlx_lm at module level';"
        "assert 'mlx.core' not in sys.modules, 'server.py imports mlx.core at module level'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# What `import mlx.core` raised here with mlx-cuda-13 0.32.4 installed: without a driver, and
# with the user-space library of driver 535 (too old for CUDA 13) but no kernel module.
NO_DRIVER = ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")
OLD_DRIVER = ImportError(
    "cudaMallocManaged(&data, size) failed: CUDA driver version is insufficient for CUDA "
    "runtime version"
)


def test_a_cuda_build_without_a_driver_says_how_to_switch_to_cpu() -> None:
    problem = mlx_import_problem(NO_DRIVER, "mlx-cuda-13 0.32.4", None)
    assert problem.startswith(
        "MLX cannot load: mlx-cuda-13 0.32.4 is installed and this host has no NVIDIA driver "
        "(libcuda.so.1: cannot open shared object file"
    )
    assert problem.endswith(
        "Either install the driver, or switch this host to the build its driver runs: "
        "RINGSERVE_MLX_BUILD=cpu scripts/setup.sh"
    )


def test_a_cuda_13_build_on_a_cuda_12_driver_names_the_build_that_fits() -> None:
    problem = mlx_import_problem(OLD_DRIVER, "mlx-cuda-13 0.32.4", "535.309.01")
    assert "this host has NVIDIA driver 535.309.01 (cudaMallocManaged" in problem
    assert problem.endswith(
        "Either update the driver, or switch this host to the build its "
        "driver runs: RINGSERVE_MLX_BUILD=cuda12 scripts/setup.sh"
    )


def test_the_build_that_fits_failing_anyway_is_reinstalled() -> None:
    problem = mlx_import_problem(ImportError("broken"), "mlx-cuda-13 0.32.4", "580.65.06")
    assert problem.endswith("(broken); reinstall it with scripts/setup.sh")


def test_any_other_import_failure_says_to_reinstall() -> None:
    problem = mlx_import_problem(ImportError("No module named 'mlx'"), None, None)
    assert problem == "MLX cannot load (No module named 'mlx'); reinstall it with scripts/setup.sh"
