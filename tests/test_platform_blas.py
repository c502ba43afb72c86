"""The BLAS MLX's CPU build computes with: the pure rules, and a real process that loads MKL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ringserve.cluster.remote import host_blas_problem
from ringserve.config.settings import PROJECT_DIR
from ringserve.platform.blas import (
    blas_in_maps,
    blas_threads,
    blas_wanted,
    mapped_files,
    missing_mkl,
)
from tests.ring import MKL_EXPECTED

VENV = "/home/me/ringserve/.venv"
BUNDLED = f"{VENV}/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
MKL = f"{VENV}/lib/libmkl_rt.so.3"
# The shape of /proc/PID/maps: anonymous regions, pseudo-files, a deleted file, a path with a
# space, and the same file mapped several times.
MAPS = f"""\
5581d6a4e000-5581d6a4f000 r--p 00000000 fd:01 1053 /usr/local/bin/python3.11
5581d7c1b000-5581d7d9e000 rw-p 00000000 00:00 0 [heap]
7f2a10000000-7f2a10021000 rw-p 00000000 00:00 0
7f2a1c2e1000-7f2a1c2e5000 r--p 00000000 fd:01 2201 {MKL}
7f2a1c2e5000-7f2a1c5d0000 r-xp 00004000 fd:01 2201 {MKL}
7f2a1d000000-7f2a1d100000 r--p 00000000 fd:01 3301 {BUNDLED}
7f2a1e000000-7f2a1e001000 r--p 00000000 fd:01 4401 /tmp/a dir/libthing.so (deleted)
7ffd4b7d0000-7ffd4b7f1000 rw-p 00000000 00:00 0 [stack]
"""

with_mkl = pytest.mark.skipif(
    not MKL_EXPECTED, reason="setup installs MKL for the CPU build on x86_64"
)


def test_maps_name_each_mapped_file_once_in_order() -> None:
    assert mapped_files(MAPS) == [
        "/usr/local/bin/python3.11",
        MKL,
        BUNDLED,
        "/tmp/a dir/libthing.so (deleted)",
    ]


def test_mkl_is_named_before_the_bundled_blas_mapped_beside_it() -> None:
    found = blas_in_maps(MAPS)
    assert found is not None and (found[0].name, found[1]) == ("MKL", MKL)


def test_the_bundled_blas_alone_is_named_as_such() -> None:
    only_bundled = "\n".join(line for line in MAPS.splitlines() if "mkl" not in line)
    found = blas_in_maps(only_bundled)
    assert found is not None
    assert (found[0].name, found[0].threads_function, found[1]) == (
        "MLX's bundled reference BLAS",
        None,
        BUNDLED,
    )


def test_a_system_openblas_is_recognised_and_no_blas_is_none() -> None:
    line = "7f00-7f10 r-xp 0 fd:01 9 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    found = blas_in_maps(line)
    assert found is not None and found[0].name == "OpenBLAS"
    assert blas_in_maps("7f00-7f10 r-xp 0 fd:01 9 /usr/lib/libc.so.6") is None


@pytest.mark.parametrize(
    ("cpus", "sharing", "threads"),
    [
        (1, 1, 1),  # pinned to a slice of one CPU
        (4, 1, 4),  # pinned to four, or alone on a 4-CPU host
        (8, 2, 4),  # two unpinned ranks on 8 CPUs: half each
        (3, 2, 1),  # an uneven split rounds down
        (1, 3, 1),  # fewer CPUs than ranks: never below one
    ],
)
def test_blas_threads_are_the_process_s_share_of_its_cpus(
    cpus: int, sharing: int, threads: int
) -> None:
    assert blas_threads(cpus, sharing) == threads


def test_mkl_is_wanted_only_for_the_cpu_build_on_linux_unless_told_bundled() -> None:
    assert blas_wanted("auto", "linux", cpu_build=True)
    assert not blas_wanted("bundled", "linux", cpu_build=True)
    assert not blas_wanted("auto", "linux", cpu_build=False)  # a CUDA build
    assert not blas_wanted("auto", "darwin", cpu_build=True)


def test_a_missing_mkl_says_how_to_fix_it_where_there_is_a_fix() -> None:
    assert "scripts/setup.sh installs it (pip install mkl)" in missing_mkl("x86_64")
    assert "RINGSERVE_CPU_BLAS=bundled" in missing_mkl("x86_64")
    assert missing_mkl("aarch64") == "PyPI has no MKL for aarch64"


def test_a_host_probe_is_judged_by_the_same_rules() -> None:
    cpu_host = {"os": "linux", "machine": "x86_64", "distributions": {"mlx-cpu": "0.32.4"}}
    assert host_blas_problem(cpu_host, "auto") == missing_mkl("x86_64")
    assert host_blas_problem(cpu_host, "bundled") is None
    with_mkl = {**cpu_host, "distributions": {"mlx-cpu": "0.32.4", "mkl": "2026.2.1"}}
    assert host_blas_problem(with_mkl, "auto") is None
    cuda_host = {**cpu_host, "distributions": {"mlx-cpu": None, "mkl": None}}
    assert host_blas_problem(cuda_host, "auto") is None
    arm_host = {**cpu_host, "machine": "aarch64"}
    assert host_blas_problem(arm_host, "auto") == "PyPI has no MKL for aarch64"


# What a process of the project does: load the BLAS, import MLX, compute, and say what it maps.
PROCESS = """
import json, os, sys
from ringserve.platform.blas import cpu_blas_line, current_cpu_blas, load_cpu_blas
if sys.argv[2] == "mlx-first":
    import mlx.core
problem = load_cpu_blas(sys.argv[1], 1)
import mlx.core as mx
import numpy as np
a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
product = np.array(mx.matmul(mx.array(a), mx.array(a), stream=mx.cpu))
blas = current_cpu_blas()
print(json.dumps({
    "line": cpu_blas_line(sys.argv[1], problem),
    "blas": blas.model_dump() if blas else None,
    "error": float(np.abs(product - a.astype(np.float64) @ a).max()),
    "preload": os.environ.get("LD_PRELOAD"),
    "maps": open("/proc/self/maps").read(),
}))
"""


def run_process(choice: str, order: str = "blas-first") -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROCESS, choice, order],
        cwd=PROJECT_DIR,
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@with_mkl
def test_a_process_that_loads_mkl_first_computes_with_it_and_leaks_nothing() -> None:
    result = run_process("auto")
    blas = result["blas"]
    assert isinstance(blas, dict)
    assert (blas["name"], blas["optimized"], blas["threads"]) == ("MKL", True, 1)
    assert blas["library"] in mapped_files(str(result["maps"]))
    assert result["line"] == [f"CPU BLAS: MKL, 1 thread ({blas['library']})", False]
    assert isinstance(result["error"], float) and result["error"] < 1e-2
    assert result["preload"] is None  # nothing for child processes to inherit


@with_mkl
def test_bundled_keeps_mlx_s_own_blas() -> None:
    result = run_process("bundled")
    blas = result["blas"]
    assert isinstance(blas, dict)
    assert (blas["name"], blas["optimized"]) == ("MLX's bundled reference BLAS", False)
    assert not any("libmkl_rt" in f for f in mapped_files(str(result["maps"])))
    line = result["line"]
    assert isinstance(line, list) and line[1] is False
    assert line[0].endswith("as RINGSERVE_CPU_BLAS=bundled asks")


@with_mkl
def test_a_process_that_cannot_load_mkl_in_time_says_so_in_one_warning() -> None:
    result = run_process("auto", order="mlx-first")
    blas = result["blas"]
    assert isinstance(blas, dict) and blas["optimized"] is False
    line = result["line"]
    assert isinstance(line, list) and line[1] is True
    assert line[0].startswith("CPU BLAS: MLX's bundled reference BLAS, 1 thread (")
    assert line[0].endswith("MLX was imported before MKL could be loaded")
