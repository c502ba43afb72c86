import json
from pathlib import Path

import mlx.core as mx
import pytest

from ringserve.errors import LaunchError, MemoryCheckError
from ringserve.platform.device import PlatformInfo
from ringserve.telemetry.memory import (
    available_from_vm_stat,
    check_weights_fit,
    free_memory_for,
    host_memory,
    host_memory_from_meminfo,
    model_weight_bytes,
    parse_meminfo,
    rank_share_bytes,
    visible_gpu_index,
)

MEMINFO = """\
MemTotal:       65842148 kB
MemFree:         1234567 kB
MemAvailable:   41234560 kB
Buffers:          204800 kB
Cached:         30000000 kB
HugePages_Total:       0
Active(file):    9000000 kB
"""

VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12345.
Pages active:                            500000.
Pages inactive:                          200000.
Pages speculative:                         3000.
Pages wired down:                        150000.
"""


def write_model(directory: Path, shards: int = 2) -> int:
    """A model directory with real safetensors written by MLX; returns its weight bytes."""
    directory.mkdir()
    for shard in range(shards):
        weights = {f"layers.{shard}.weight": mx.zeros((256, 256), dtype=mx.float16)}
        mx.save_safetensors(str(directory / f"model-{shard:05d}.safetensors"), weights)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def test_meminfo_is_parsed_into_bytes() -> None:
    fields = parse_meminfo(MEMINFO)
    assert fields["MemTotal"] == 65842148 * 1024
    assert fields["HugePages_Total"] == 0
    assert fields["Active(file)"] == 9000000 * 1024
    memory = host_memory_from_meminfo(MEMINFO)
    assert (memory.total, memory.available) == (65842148 * 1024, 41234560 * 1024)


def test_old_kernels_without_memavailable_estimate_it() -> None:
    text = "\n".join(line for line in MEMINFO.splitlines() if "MemAvailable" not in line)
    assert host_memory_from_meminfo(text).available == (1234567 + 30000000 + 204800) * 1024


def test_vm_stat_counts_free_inactive_and_speculative_pages() -> None:
    assert available_from_vm_stat(VM_STAT) == (12345 + 200000 + 3000) * 16384


def test_this_host_reports_real_memory() -> None:
    memory = host_memory()
    assert 0 < memory.available <= memory.total


def test_weight_bytes_come_from_the_safetensors_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    written = write_model(model)
    assert written > 2 * 256 * 256 * 2
    assert model_weight_bytes(model) == written
    assert model_weight_bytes(model / "model-00000.safetensors") < written


def test_weight_bytes_fall_back_to_the_index(tmp_path: Path) -> None:
    index = {"metadata": {"total_size": 16_000_000_000}, "weight_map": {}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert model_weight_bytes(tmp_path) == 16_000_000_000


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MemoryCheckError, match="no safetensors weights"):
        model_weight_bytes(tmp_path)


def test_rank_share_rounds_up() -> None:
    assert rank_share_bytes(10, 3) == 4
    assert rank_share_bytes(9, 3) == 3
    with pytest.raises(ValueError):
        rank_share_bytes(10, 0)


def test_memory_check_refuses_a_budget_smaller_than_the_share(tmp_path: Path) -> None:
    model = tmp_path / "tiny-qwen"
    weights = write_model(model)
    budget = weights // 4

    with pytest.raises(MemoryCheckError) as refused:
        check_weights_fit(
            model_weight_bytes(model),
            model.name,
            world_size=2,
            free_bytes=budget,
            host_name="mac-studio-2",
            from_budget=True,
        )

    assert isinstance(refused.value, LaunchError)
    message = str(refused.value)
    assert "host mac-studio-2" in message
    assert "tiny-qwen" in message
    assert "split 2 ways" in message
    assert "budgeted by RINGSERVE_MEMORY_BUDGET but needs" in message
    assert " MiB" in message


def test_memory_check_counts_every_rank_on_the_host(tmp_path: Path) -> None:
    model = tmp_path / "model"
    weights = write_model(model)
    total = model_weight_bytes(model)
    check_weights_fit(total, model.name, 2, free_bytes=weights, host_name="a")
    with pytest.raises(MemoryCheckError, match="2 of 2 ranks"):
        check_weights_fit(total, model.name, 2, free_bytes=weights, host_name="a", ranks_on_host=2)


def test_the_memory_check_judges_the_weights_against_what_is_free(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_model(model)
    weights = model_weight_bytes(model)
    cpu = PlatformInfo("cpu", "CPU", host_memory().total, "test")
    assert free_memory_for(cpu) > weights  # this machine holds the small model
    check_weights_fit(weights, model.name, 1, free_bytes=free_memory_for(cpu), host_name="here")
    with pytest.raises(MemoryCheckError, match="host here"):
        check_weights_fit(weights, model.name, 1, free_bytes=weights // 2, host_name="here")


def test_a_budget_replaces_the_real_free_memory() -> None:
    cpu = PlatformInfo("cpu", "CPU", 1, "test")
    assert free_memory_for(cpu, budget=1234) == 1234
    assert free_memory_for(cpu) == pytest.approx(host_memory().available, rel=0.2)


def test_the_gpu_a_rank_checks_is_the_one_it_was_given() -> None:
    assert visible_gpu_index("3") == 3
    assert visible_gpu_index("2,3") == 2
    assert visible_gpu_index(None) == 0
    assert visible_gpu_index("GPU-0c3e8d2b") == 0  # a UUID: fall back to the first GPU
