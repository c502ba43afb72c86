"""Opening the prefix cache at start, alike on every rank: the KV format checked against the
model, what an entry costs on disk agreed, and the entries that every rank found on disk
taken in (those not held by every rank removed) before the first request.

Every rank calls `open_prefix_cache` at the same point of its start: it runs the model once
(its own collectives inside) and makes the same collectives in the same order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from ringserve.config.settings import KV_GROUP_SIZES, Settings
from ringserve.distributed.agreement import all_agree, gather_lists, gather_rows, held_by_all
from ringserve.engine.kv_format import KvFormat, cache_arrays, stored_form, unfit_widths
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.engine.prefix_disk import PART, SUFFIX, DiskStore, Found
from ringserve.engine.prefix_index import DiskBudget, Owner, kept_owner
from ringserve.errors import ConfigError
from ringserve.telemetry.memory import human_bytes

log = logging.getLogger(__name__)

# Two probe lengths: the files' sizes at both give what an entry costs and what a token costs.
PROBE_TOKENS = (16, 48)
# What a file's header may grow by past the probe's (longer offsets, per array).
HEADER_SLACK = 4096
ARRAY_SLACK = 64


@dataclass(frozen=True)
class Placement:
    """What this rank's entries were made with: a file is reused only when all of it matches."""

    model_path: str
    revision: str
    layout: str
    split: tuple[int, ...]
    ranks: int
    rank: int


def model_identity(model_path: str) -> str:
    """The model's files as a digest: config.json's content and each weight file's resolved
    name (a hub cache names its blobs by their hash), size and modification time."""
    root = Path(model_path)
    digest = hashlib.blake2b(digest_size=16)
    config = root / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(root.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{os.path.realpath(weights)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def fingerprint(placement: Placement, kv: KvFormat) -> dict[str, object]:
    return {
        "model": model_identity(placement.model_path),
        "revision": placement.revision,
        "layout": placement.layout,
        "split": list(placement.split),
        "ranks": placement.ranks,
        "rank": placement.rank,
        "kv": kv.name,
    }


def open_prefix_cache(
    settings: Settings,
    model: nn.Module,
    group: mx.distributed.Group,
    stream: Any,
    placement: Placement,
) -> PrefixCache:
    kv = KvFormat(settings.kv_bits, settings.kv_group_size)
    budget, shared = settings.prefix_cache_tokens, settings.prefix_cache_shared
    if budget == 0:
        return PrefixCache(model, 0)
    disk_on = settings.prefix_cache_disk_bytes > 0
    if not disk_on and not kv.quantized:
        log.info("prefix cache: %d tokens in RAM, no disk tier", budget)
        return PrefixCache(model, budget, shared)
    store, problem = None, None
    if disk_on:
        directory = settings.prefix_cache_path / f"rank{placement.rank}"
        try:
            store = DiskStore(directory, fingerprint(placement, kv))
        except OSError as exc:
            problem = f"{directory}: {exc.strerror or exc}"
    try:
        disk_budget = _measure(
            model, group, stream, kv, store, problem, settings.prefix_cache_disk_bytes
        )
    except ConfigError:
        if store is not None:
            store.close(0)
        raise

    def agree(ok: bool) -> bool:
        return all_agree(group, ok, stream)

    cache = PrefixCache(model, budget, shared, kv, store, disk_budget, agree)
    if store is None:
        log.info("prefix cache: %d tokens in RAM, KV %s, no disk tier", budget, kv.name)
        return cache
    cache.restore(_held_by_every_rank(store, group, stream))
    log.info(
        "prefix cache: %d tokens in RAM, KV %s; disk %s in %s (an entry counts %d bytes + %d "
        "a token), %d entries reopened",
        budget,
        kv.name,
        human_bytes(disk_budget.bytes),
        store.directory,
        disk_budget.entry_bytes,
        disk_budget.token_bytes,
        cache.index.disk_entries,
    )
    return cache


def _measure(
    model: nn.Module,
    group: mx.distributed.Group,
    stream: Any,
    kv: KvFormat,
    store: DiskStore | None,
    problem: str | None,
    disk_bytes: int,
) -> DiskBudget:
    """The disk tier's budget, what an entry is counted as the largest file any rank writes.
    ConfigError on every rank alike when some rank's KV heads do not take the KV format, or
    some rank cannot write its directory (`problem`: this rank's reason)."""
    probes = [probe_cache(model, tokens, stream) for tokens in PROBE_TOKENS]
    unfit = unfit_widths(probes[-1], kv)
    entry_bytes = token_bytes = 0
    if store is not None:
        try:
            entry_bytes, token_bytes = file_costs(store, probes, kv)
        except OSError as exc:
            problem = f"{store.directory}: {exc.strerror or exc}"
    mine = [unfit[0] if unfit else 0, entry_bytes, token_bytes, int(problem is not None)]
    rows = gather_rows(group, mine, stream)
    refused = sorted({row[0] for row in rows if row[0]})
    if refused:
        raise ConfigError(kv_refusal(kv, refused))
    unwritable = [rank for rank, row in enumerate(rows) if row[3]]
    if unwritable:
        where = f" ({problem})" if problem else ""
        raise ConfigError(
            f"rank(s) {', '.join(map(str, unwritable))} cannot write the prefix cache's "
            f"directory{where}: set RINGSERVE_PREFIX_CACHE_DIR to a directory each host can "
            "write, or RINGSERVE_PREFIX_CACHE_DISK_BYTES=0"
        )
    if store is None:
        return DiskBudget()
    return DiskBudget(disk_bytes, max(row[1] for row in rows), max(row[2] for row in rows))


def _held_by_every_rank(store: DiskStore, group: mx.distributed.Group, stream: Any) -> list[Found]:
    """The entries this rank found that every rank found; this rank's others are removed."""
    found = store.scan()
    lists = gather_lists(group, [n for f in found for n in (f.key, f.ident)], stream)
    common = held_by_all([set(zip(numbers[::2], numbers[1::2], strict=True)) for numbers in lists])
    for f in found:
        if (f.key, f.ident) not in common:
            store.delete(f.key)
    agreed = [f for f in found if (f.key, f.ident) in common]
    if len(agreed) < len(found):
        log.info(
            "prefix cache on disk: removed %d entries not every rank holds",
            len(found) - len(agreed),
        )
    return agreed


def kv_refusal(kv: KvFormat, widths: Sequence[int]) -> str:
    shown = ", ".join(map(str, widths))
    fitting = [g for g in KV_GROUP_SIZES if all(w % g == 0 for w in widths)]
    fix = (
        f"set RINGSERVE_KV_GROUP_SIZE={fitting[-1]}, or RINGSERVE_KV_BITS=0"
        if fitting
        else f"MLX quantizes in groups of {', '.join(map(str, KV_GROUP_SIZES))}, so set "
        "RINGSERVE_KV_BITS=0 for this model"
    )
    return (
        f"RINGSERVE_KV_BITS={kv.bits} quantizes the stored KV in groups of "
        f"RINGSERVE_KV_GROUP_SIZE={kv.group_size}, but this model's KV heads are {shown} wide; "
        f"{fix}"
    )


def probe_cache(model: nn.Module, tokens: int, stream: Any) -> list[Any]:
    """The cache of a `tokens`-long prompt, as the model makes it on this rank."""
    cache = make_prompt_cache(model)
    with mx.stream(stream):
        logits = model(mx.zeros((1, tokens), dtype=mx.int32), cache=cache)  # any ids do
        mx.eval(logits, cache_arrays(cache))
    return cache


def file_costs(store: DiskStore, probes: Sequence[list[Any]], kv: KvFormat) -> tuple[int, int]:
    """What an entry file costs on this rank: bytes for the entry, and bytes per token."""
    owner = kept_owner(Owner("0" * 16, "conversation"))
    sizes = []
    for tokens, cache in zip(PROBE_TOKENS, probes, strict=True):
        path = store.directory / f".probe-{tokens}{PART}{SUFFIX}"
        stored = stored_form(cache, kv)
        store.save(path, stored, 1 << 62, [0] * tokens, owner)
        sizes.append(path.stat().st_size)
        path.unlink()
        arrays = len(cache_arrays(stored))
    per_token = math.ceil((sizes[1] - sizes[0]) / (PROBE_TOKENS[1] - PROBE_TOKENS[0]))
    per_entry = max(0, sizes[0] - per_token * PROBE_TOKENS[0])
    return per_entry + HEADER_SLACK + ARRAY_SLACK * arrays, per_token
