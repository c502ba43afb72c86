"""The prefix cache's disk tier and KV formats on one process: files that are private, checked
and reopened; damaged, half-written and foreign files removed; quantized entries that answer
close to full precision; a disk entry some rank cannot read is a miss everywhere."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    load_prompt_cache,
    save_prompt_cache,
)

from ringserve.config.settings import load_settings
from ringserve.distributed.agreement import held_by_all
from ringserve.engine.cache_file import file_parts, write_parts
from ringserve.engine.kv_format import (
    KvFormat,
    cache_arrays,
    cache_bytes,
    stored_form,
    unfit_widths,
    working_copy,
)
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.engine.prefix_disk import DiskStore
from ringserve.engine.prefix_index import DiskBudget, Owner, kept_owner
from ringserve.engine.prefix_start import (
    PROBE_TOKENS,
    Placement,
    file_costs,
    kv_refusal,
    open_prefix_cache,
    probe_cache,
)
from ringserve.errors import ConfigError
from ringserve.model.demo import ensure_demo_model
from tests.families import Variant, family_model
from tests.test_prefix_cache import PROMPT, run

FINGERPRINT = {"model": "tiny", "rank": 0, "kv": "model"}
NO_FILE = Path("/nonexistent/.env")
STREAM = mx.default_stream(mx.default_device())


@pytest.fixture(scope="module")
def model(models_dir: Path) -> Any:
    return load(str(ensure_demo_model(models_dir, "tiny")))[0]


@pytest.fixture(scope="module")
def wide_model(models_dir: Path) -> Any:
    """Heads 32 wide, which KV quantization in groups of 32 takes."""
    return load(str(family_model(models_dir, Variant("llama", scale=2))))[0]


def tiered(model: Any, directory: Path, kv: KvFormat | None = None, **kwargs: Any) -> PrefixCache:
    """A prefix cache with a disk tier in `directory`, its costs measured as at start."""
    kv = kv or KvFormat()
    store = DiskStore(directory, {**FINGERPRINT, "kv": kv.name})
    probes = [probe_cache(model, tokens, STREAM) for tokens in PROBE_TOKENS]
    budget = DiskBudget(kwargs.pop("disk_bytes", 10 << 20), *file_costs(store, probes, kv))
    return PrefixCache(model, kwargs.pop("budget_tokens", 1000), False, kv, store, budget, **kwargs)


def reopened(model: Any, directory: Path, kv: KvFormat | None = None) -> PrefixCache:
    cache = tiered(model, directory, kv)
    assert cache.disk is not None
    cache.restore(cache.disk.scan())
    return cache


def entry_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def test_an_entry_file_is_private_checked_and_reopened_with_its_owner(
    model: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "cache" / "rank0"
    cache = tiered(model, directory)
    answer, _ = run(model, cache, PROMPT, steps=4)
    cache.close()
    (file,) = entry_files(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert cache.usage()["disk_bytes"] == file.stat().st_size
    assert cache.stats()["disk_charged_bytes"] >= file.stat().st_size

    again = reopened(model, directory)
    (entry,) = again.index.entries.values()
    assert entry.tokens == (*PROMPT, *answer) and entry.owner == kept_owner(Owner())
    assert not entry.in_ram and entry.on_disk
    cold, _ = run(model, PrefixCache(model, 0), [*PROMPT, *answer, 5], steps=6)
    warm, cached = run(model, again, [*PROMPT, *answer, 5], steps=6)
    assert (warm, cached) == (cold, len(PROMPT) + 4)
    assert again.stats()["disk_hits"] == 1
    # Another scope does not find it.
    _, foreign = run(model, again, [*PROMPT, *answer, 5], steps=2, scope="other")
    assert foreign == 0


def test_damaged_half_written_and_foreign_files_are_removed_at_start(
    model: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "rank0"
    cache = tiered(model, directory)
    for first in (1, 2, 3):
        run(model, cache, [first, *PROMPT], steps=2)
    cache.close()
    truncated, intact, _ = entry_files(directory)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (directory / ".0000000000000009-0000000000000001.part.safetensors").write_bytes(b"half")
    foreign = DiskStore(tmp_path / "elsewhere", {**FINGERPRINT, "model": "another"})
    foreign.save(directory / intact.name.replace("-", "-f", 1), [], 1, [1, 2], Owner())
    foreign.close(1)
    with caplog.at_level(logging.INFO):
        found = DiskStore(directory, FINGERPRINT).scan()
    assert len(found) == 2 and truncated.name not in {f.path.name for f in found}
    assert len(entry_files(directory)) == 2 and not list(directory.glob(".*"))
    (line,) = [r.getMessage() for r in caplog.records if "entries found" in r.getMessage()]
    assert line.endswith(
        "2 entries found; removed 1 half-written, 1 made for another model, layout, rank or KV "
        "format, 1 unreadable or truncated"
    )


def test_a_file_damaged_after_start_is_a_miss_on_every_rank(model: Any, tmp_path: Path) -> None:
    """Two ranks' caches with the same entry; one rank's file goes bad. Each rank learns from
    the agreement (here: what the other rank said) that not every rank read it: both miss,
    both drop the entry, both digests stay equal."""
    ranks = [tiered(model, tmp_path / f"rank{r}") for r in (0, 1)]
    for cache in ranks:
        run(model, cache, PROMPT, steps=3)
        cache.close()
    reopened_ranks = [reopened(model, tmp_path / f"rank{r}") for r in (0, 1)]
    (damaged,) = entry_files(tmp_path / "rank1")
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte in the KV data: only the checksum sees it
    damaged.write_bytes(bytes(data))
    reads = [
        cache.disk is not None and cache.disk.read(key) is not None
        for cache in reopened_ranks
        for key in cache.index.entries
    ]
    assert reads == [True, False]
    assert not entry_files(tmp_path / "rank1")  # the damaged file was removed
    for cache in reopened_ranks:
        cache.agree = lambda ok: all(reads)
    for cache in reopened_ranks:
        _, cached = run(model, cache, [*PROMPT, 1], steps=2)
        assert cached == 0
    first, second = (cache.stats() for cache in reopened_ranks)
    assert first == second and first["unreadable"] == 1 and first["misses"] == 1


def test_the_disk_budget_holds_and_the_oldest_entries_leave_it(model: Any, tmp_path: Path) -> None:
    directory = tmp_path / "rank0"
    per_entry = tiered(model, tmp_path / "probe").index.disk.cost(len(PROMPT) + 2)
    cache = tiered(model, directory, budget_tokens=60, disk_bytes=3 * per_entry)
    for first in range(6):
        run(model, cache, [100 + first, *PROMPT[1:]], steps=2)
        assert cache.disk is not None and cache.disk.flush(10)
        assert sum(p.stat().st_size for p in directory.iterdir()) <= 3 * per_entry
    stats = cache.stats()
    assert (stats["disk_entries"], stats["ram_entries"]) == (3, 1)
    assert stats["evictions"] == 3
    kept = {e.tokens[0] for e in cache.index.entries.values()}
    assert kept == {103, 104, 105}


def test_quantized_entries_keep_a_quarter_of_the_bytes_and_answer_close_to_full_precision(
    wide_model: Any, tmp_path: Path
) -> None:
    (probe,) = [probe_cache(wide_model, 48, STREAM)]
    full, eight, four = (stored_form(probe, KvFormat(bits, 32)) for bits in (0, 8, 4))
    assert all(type(layer) is KVCache for layer in full)
    assert all(isinstance(layer, QuantizedKVCache) for layer in eight + four)
    # float32 values: 8 bits and a float32 scale and bias per 32 values, 4 bits likewise.
    assert cache_bytes(eight) / cache_bytes(full) == pytest.approx((8 + 2) / 32)
    assert cache_bytes(four) / cache_bytes(full) == pytest.approx((4 + 2) / 32)
    back = working_copy(eight)
    for original, restored in zip(full, back, strict=True):
        assert type(restored) is KVCache and restored.offset == original.offset
        error = np.abs(np.array(restored.keys) - np.array(original.keys)).max()
        assert 0 < error < 0.02 * np.abs(np.array(original.keys)).max()

    kv = KvFormat(8, 32)
    cache = tiered(wide_model, tmp_path / "q8", kv)
    answer, _ = run(wide_model, cache, PROMPT, steps=4)
    cache.close()
    again = reopened(wide_model, tmp_path / "q8", kv)
    _, cached = run(wide_model, again, [*PROMPT, *answer, 3], steps=4)
    assert cached == len(PROMPT) + 4


def test_a_kv_format_the_heads_cannot_take_is_named(model: Any, wide_model: Any) -> None:
    tiny, wide = (probe_cache(m, 16, STREAM) for m in (model, wide_model))
    assert unfit_widths(tiny, KvFormat(8, 32)) == [16]
    assert unfit_widths(wide, KvFormat(8, 32)) == [] and unfit_widths(wide, KvFormat(8, 64)) == [32]
    assert unfit_widths(tiny, KvFormat(0, 64)) == []
    assert kv_refusal(KvFormat(8, 64), [32]).endswith(
        "heads are 32 wide; set RINGSERVE_KV_GROUP_SIZE=32, or RINGSERVE_KV_BITS=0"
    )
    assert "set RINGSERVE_KV_BITS=0 for this model" in kv_refusal(KvFormat(4, 32), [16])


def test_an_entry_file_is_what_mlx_lm_saves_and_loads(wide_model: Any, tmp_path: Path) -> None:
    """Written without MLX's save (off the model's thread), read by mlx-lm's load."""
    probe = probe_cache(wide_model, 20, STREAM)
    half = KVCache()
    half.update_and_fetch(*(mx.random.normal((1, 2, 20, 32)).astype(mx.bfloat16),) * 2)
    for index, cache in enumerate(
        (stored_form(probe, KvFormat()), stored_form(probe, KvFormat(4, 32)), [half])
    ):
        ours, theirs = tmp_path / f"ours-{index}.safetensors", tmp_path / "theirs.safetensors"
        write_parts(ours, file_parts(cache, {"note": "x"}))
        save_prompt_cache(str(theirs), cache, {"note": "x"})
        (loaded, meta), (expected, expected_meta) = (
            load_prompt_cache(str(path), return_metadata=True) for path in (ours, theirs)
        )
        assert meta == expected_meta == {"note": "x"}
        for layer, reference in zip(loaded, expected, strict=True):
            assert type(layer) is type(reference) and layer.offset == reference.offset
            for a, b in zip(cache_arrays([layer]), cache_arrays([reference]), strict=True):
                assert a.dtype == b.dtype and mx.array_equal(a, b).item()


def test_the_ranks_keep_only_what_every_rank_holds() -> None:
    assert held_by_all([{(1, 5), (2, 6)}, {(2, 6), (3, 7)}]) == {(2, 6)}
    assert held_by_all([[1, 2, 3]]) == {1, 2, 3}
    assert held_by_all([]) == set()


def placement(model_path: str = "tiny") -> Placement:
    return Placement(model_path, "", "tensor", (), ranks=1, rank=0)


def test_a_cache_opened_at_start_reopens_what_the_last_run_stored(
    model: Any, models_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(NO_FILE, {"RINGSERVE_RUN_DIR": str(tmp_path / "run")})
    where = placement(str(ensure_demo_model(models_dir, "tiny")))
    first = open_prefix_cache(settings, model, mx.distributed.init(), STREAM, where)
    answer, _ = run(model, first, PROMPT, steps=3)
    first.close()
    assert entry_files(tmp_path / "run" / "prefix-cache" / "rank0")
    again = open_prefix_cache(settings, model, mx.distributed.init(), STREAM, where)
    _, cached = run(model, again, [*PROMPT, *answer, 4], steps=2)
    assert cached == len(PROMPT) + 3 and again.stats()["disk_hits"] == 1


def test_a_directory_a_rank_cannot_write_is_refused_at_start(model: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = load_settings(NO_FILE, {"RINGSERVE_PREFIX_CACHE_DIR": str(blocker)})
    with pytest.raises(ConfigError) as refused:
        open_prefix_cache(settings, model, mx.distributed.init(), STREAM, placement())
    assert str(refused.value) == (
        f"rank(s) 0 cannot write the prefix cache's directory ({blocker}/rank0: Not a "
        "directory): set RINGSERVE_PREFIX_CACHE_DIR to a directory each host can write, or "
        "RINGSERVE_PREFIX_CACHE_DISK_BYTES=0"
    )
