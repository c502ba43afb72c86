import json
from pathlib import Path

from ringserve.cluster.status_view import gpu_section
from ringserve.telemetry.nvml import gpu_report_from_answers

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
GIB = 1024**3


def _rank(rank: int, host: str, **fields: object) -> dict[str, object]:
    report: dict[str, object] = {
        "rank": rank,
        "hostname": host,
        "pid": 100 + rank,
        "platform": "cpu",
        "device": "no GPU: running on CPU (no NVIDIA driver and no Metal on this host)",
        "host_memory_total": 64 * GIB,
        "host_memory_available": 40 * GIB,
        "gpus": [],
        "gpu_reason": "no NVIDIA GPU",
    }
    report.update(fields)
    return report


def test_status_groups_ranks_by_host_with_memory_and_gpus() -> None:
    report = gpu_report_from_answers(json.loads((FIXTURES / "laptop_gtx1650.json").read_text()))
    gpus = [gpu.model_dump(mode="json") for gpu in report.gpus]
    cuda = "GPU: NVIDIA GeForce GTX 1650 (4.0 GiB) via MLX CUDA"
    ranks = [
        _rank(2, "laptop", platform="cuda", device=cuda, gpus=gpus, gpu_reason=None),
        _rank(0, "mac"),
        _rank(1, "mac"),
    ]
    lines = gpu_section(ranks)

    assert lines[0] == "host mac: RAM 64.0 GiB, 40.0 GiB available"
    assert lines[1] == "  no GPU listed: no NVIDIA GPU"
    assert lines[2].startswith("  rank 0 (pid 100): no GPU: running on CPU")
    assert lines[3].startswith("  rank 1 (pid 101)")
    assert lines[4] == "host laptop: RAM 64.0 GiB, 40.0 GiB available"
    assert lines[5].startswith("  GPU 0 NVIDIA GeForce GTX 1650")
    assert "used" in lines[5] and "W" not in lines[5].split(",")[-1]  # this board has no power
    assert lines[6] == "  GPU 1 NVIDIA GPU, unreadable: GPU is lost"
    assert lines[7] == f"  rank 2 (pid 102): {cuda}"


def test_status_names_the_blas_each_cpu_rank_computes_with() -> None:
    mkl = {"name": "MKL", "library": "/v/lib/libmkl_rt.so.3", "optimized": True, "threads": 4}
    lines = gpu_section([_rank(0, "box", cpus="0-3", cpu_blas=mkl), _rank(1, "mac")])
    assert lines[2].startswith("  rank 0 (pid 100, CPUs 0-3): no GPU: running on CPU")
    assert lines[2].endswith("; CPU BLAS MKL, 4 threads")
    assert "BLAS" not in lines[5]  # a rank that reports none (macOS) shows none


def test_status_shows_what_each_ranks_prefix_cache_holds_in_ram_and_on_disk() -> None:
    stats = {"budget_tokens": 16384, "tokens": 900, "disk_budget_bytes": 8 * GIB}
    stats |= {"disk_entries": 12, "ram_hits": 5, "disk_hits": 2, "misses": 3}
    usage = {"ram_bytes": 3 * 1024**2, "disk_bytes": GIB // 2}
    lines = gpu_section([_rank(0, "mac", prefix_cache=stats, prefix_cache_bytes=usage)])
    assert lines[3] == (
        "    prefix cache: RAM 3.0 MiB (900 of 16384 tokens), disk 512.0 MiB of 8.0 GiB "
        "(12 entries); hits 5 from RAM, 2 from disk, 3 misses"
    )
