import logging
import os
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

from ringserve.platform.device import (
    PlatformInfo,
    Probe,
    apply_wired_limit,
    describe,
    detect_platform,
    install_mlx_shims,
    platform_from_probe,
)
from ringserve.platform.process_env import library_path, nvidia_library_dirs, rank_environment
from ringserve.telemetry.nvml import GpuInfo

H100 = GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_total=85520809984)


def test_this_host_runs_on_cpu_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    if mx.metal.is_available() or mx.cuda.is_available():
        pytest.skip("this host has a GPU MLX can use")
    with caplog.at_level(logging.INFO, logger="ringserve.platform.device"):
        info = detect_platform()

    assert info.kind == "cpu"
    assert info.memory_bytes > 0
    assert info.reason
    line = describe(info)
    assert line == f"no GPU: running on CPU ({info.reason})"
    assert line in caplog.text
    assert rank_environment(info.kind) == {}
    assert apply_wired_limit(info) is None


def test_describe_gives_one_line_per_platform() -> None:
    cuda = platform_from_probe(Probe(cuda_available=True, gpu=H100, nvidia_driver="550.54.15"))
    assert describe(cuda) == "GPU: NVIDIA H100 80GB HBM3 (79.6 GiB) via MLX CUDA"
    assert cuda.warning is None

    metal = platform_from_probe(
        Probe(
            metal_available=True,
            device_info={"device_name": "Apple M2 Ultra", "memory_size": 192 * 1024**3},
        )
    )
    assert describe(metal) == "GPU: Apple M2 Ultra (192.0 GiB unified) via MLX Metal"


def test_cuda_without_nvml_still_uses_the_gpu_and_warns() -> None:
    probe = Probe(
        cuda_available=True,
        device_info={"device_name": "NVIDIA L4", "total_memory": 23 * 1024**3},
        nvml_reason="NVML not available: Driver/library version mismatch",
    )
    info = platform_from_probe(probe)
    assert describe(info) == "GPU: NVIDIA L4 (23.0 GiB) via MLX CUDA"
    assert info.warning is not None and "version mismatch" in info.warning


def test_a_gpu_mlx_cannot_use_falls_back_to_cpu_with_a_warning() -> None:
    no_cuda_build = platform_from_probe(Probe(nvidia_driver="550.54.15", gpu=H100))
    assert no_cuda_build.kind == "cpu"
    assert no_cuda_build.warning is not None and "mlx[cuda12]" in no_cuda_build.warning
    assert "no CUDA backend" in describe(no_cuda_build)

    broken = platform_from_probe(
        Probe(
            nvidia_driver="580.65.06",
            mlx_cuda_package="mlx-cuda-13 0.32.4",
            cuda_error="RuntimeError: CUDA driver version is insufficient",
            nvml_reason="NVML not available: Driver Not Loaded",
        )
    )
    assert broken.kind == "cpu"
    assert broken.warning is not None and "insufficient" in broken.warning

    old_driver = platform_from_probe(Probe(nvidia_driver="470.256.02"))
    assert old_driver.kind == "cpu" and "too old" in old_driver.reason


def test_metal_settings_stay_on_metal(tmp_path: Path) -> None:
    assert rank_environment("metal") == {"MLX_METAL_FAST_SYNCH": "1"}
    assert "MLX_METAL_FAST_SYNCH" not in rank_environment("cuda", site_packages=[tmp_path])
    assert rank_environment("cpu") == {}


def test_cuda_library_path_lists_the_nvidia_wheel_libraries(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    user_site = tmp_path / "user-site"
    for lib in ("cublas/lib", "cuda_runtime/lib", "nccl/lib"):
        (site / "nvidia" / lib).mkdir(parents=True)
    (site / "nvidia" / "cudnn").mkdir()  # a wheel without a lib directory
    (user_site / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (site / "mlx" / "lib").mkdir(parents=True)

    dirs = nvidia_library_dirs([site, user_site, tmp_path / "absent"])
    assert dirs == [
        site / "nvidia" / "cublas" / "lib",
        site / "nvidia" / "cuda_runtime" / "lib",
        site / "nvidia" / "nccl" / "lib",
        user_site / "nvidia" / "cu13" / "lib",
    ]

    env = rank_environment(
        "cuda", site_packages=[site, user_site], environ={"LD_LIBRARY_PATH": "/opt/x/lib"}
    )
    parts = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert parts == [*map(str, dirs), "/opt/x/lib"]
    assert library_path(dirs[:1], f"{dirs[0]}{os.pathsep}") == str(dirs[0])
    assert rank_environment("cuda", site_packages=[tmp_path / "absent"], environ={}) == {}


def test_shims_leave_present_functions_alone() -> None:
    before = mx.new_thread_local_stream
    assert install_mlx_shims(mx) == []
    assert mx.new_thread_local_stream is before


def test_shims_fill_what_an_older_build_lacks() -> None:
    made: list[str] = []

    def new_stream(device: str) -> str:
        made.append(device)
        return f"stream on {device}"

    old_build = SimpleNamespace(
        new_stream=new_stream,
        metal=SimpleNamespace(device_info=lambda: {"architecture": "sm_90"}),
    )

    assert install_mlx_shims(old_build) == ["new_thread_local_stream", "device_info"]
    assert old_build.new_thread_local_stream("gpu") == "stream on gpu"
    assert made == ["gpu"]
    assert old_build.device_info() == {"architecture": "sm_90"}
    assert install_mlx_shims(old_build) == []


def test_platform_info_is_plain_frozen_data() -> None:
    info = PlatformInfo("cpu", "CPU", 1, "reason")
    with pytest.raises(AttributeError):
        info.kind = "cuda"  # type: ignore[misc]
