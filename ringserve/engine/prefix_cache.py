"""Per-rank KV prefix cache: each rank keeps the KV of its own heads (or layers) for reuse
across turns, in RAM and, with a disk tier, in files that outlive the process.

What to reuse, store, spill and evict is decided by PrefixIndex from broadcast data only, so
every rank holds the same entries. Stored caches are never generated into: a hit works on a
copy (dequantized when the entries are kept quantized). Reading an entry back from disk is the
one thing a rank can fail at alone (a damaged or missing file): the ranks then agree, with one
collective, to treat the hit as a miss and drop the entry everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    CacheList,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from ringserve.engine.kv_format import (
    KvFormat,
    cache_arrays,
    cache_bytes,
    stored_form,
    working_copy,
)
from ringserve.engine.prefix_disk import DiskStore, Found
from ringserve.engine.prefix_index import (
    DiskBudget,
    Match,
    Owner,
    PrefixIndex,
    Restored,
    kept_owner,
)

log = logging.getLogger(__name__)


def cache_length(cache: list[Any]) -> int:
    """Tokens the cache holds, read off its first layer that counts them (a recurrent layer's
    state does not)."""
    for layer in cache:
        for part in layer.caches if isinstance(layer, CacheList) else (layer,):
            offset = getattr(part, "offset", None)
            if offset is not None:
                return int(offset)
    return 0


def cache_slots(cache: list[Any]) -> int:
    """KV positions the cache has allocated, which is what it holds in memory (a cache that
    grew in mlx-lm's steps of 256 may hold more than its tokens)."""
    slots = cache_length(cache)
    for layer in cache:
        keys = getattr(layer, "keys", None)
        first = keys[0] if isinstance(keys, tuple | list) else keys  # quantized: (data, ...)
        shape = getattr(first, "shape", None)
        if shape is not None and len(shape) >= 2:
            slots = max(slots, int(shape[-2]))
    return slots


class PrefixCache:
    def __init__(
        self,
        model: nn.Module,
        budget_tokens: int = 0,
        shared: bool = False,
        kv: KvFormat | None = None,
        disk: DiskStore | None = None,
        disk_budget: DiskBudget | None = None,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        """`agree(ok)` tells whether every rank passed True (a collective; the identity on one
        rank); `disk` and `disk_budget` together make the disk tier."""
        self.model = model
        self.kv = kv or KvFormat()
        self.disk = disk if disk_budget is not None and disk_budget.enabled else None
        self.index = PrefixIndex(budget_tokens, shared, disk_budget if self.disk else None)
        self.caches: dict[int, list[Any]] = {}  # the RAM tier
        self.agree = agree or (lambda ok: ok)
        self._ram_bytes: dict[int, int] = {}
        self.ram_bytes = 0  # this rank's (its shard's) bytes in RAM

    @property
    def enabled(self) -> bool:
        return self.index.budget_tokens > 0

    def restore(self, found: Sequence[Found]) -> None:
        """Take in the entries every rank found on disk at start (the same list everywhere)."""
        if self.disk is None:
            return
        restored = [Restored(f.key, f.tokens, f.owner) for f in found]
        for dropped in self.index.restore(restored):
            self.disk.delete(dropped.key)

    def checkout(self, tokens: Sequence[int], owner: Owner) -> tuple[list[int], list[Any], int]:
        """The tokens still to prefill, a cache to generate into, and how many were reused."""
        owner = kept_owner(owner)
        match = self.index.lookup(tokens, owner) if self.enabled else None
        if match is None:
            return list(tokens), make_prompt_cache(self.model), 0
        stored = self._read_back(match) if match.from_disk else self.caches[match.key]
        if stored is None:
            return list(tokens), make_prompt_cache(self.model), 0
        surplus = len(self.index.entries[match.key].tokens) - match.reused
        if surplus and not can_trim_prompt_cache(stored):
            self.index.rejected(match)
            return list(tokens), make_prompt_cache(self.model), 0
        cache = working_copy(stored)
        if surplus:
            trim_prompt_cache(cache, surplus)
        return list(tokens[match.reused :]), cache, match.reused

    def _read_back(self, match: Match) -> list[Any] | None:
        """A disk entry's cache when every rank read its file; else None on every rank, and
        the entry is gone everywhere."""
        assert self.disk is not None
        stored = self.disk.read(match.key)
        if self.agree(stored is not None):
            return stored
        self.index.unreadable(match)
        self.disk.delete(match.key)
        return None

    def store(self, tokens: Sequence[int], cache: list[Any], owner: Owner) -> None:
        """Keep a finished turn: its prompt and answer, exactly what its KV cache holds."""
        if not self.enabled:
            return
        owner = kept_owner(owner)
        if cache_length(cache) != len(tokens):
            log.warning(
                "not storing a turn: its cache holds %d of %d tokens",
                cache_length(cache),
                len(tokens),
            )
            self.index.discarded(len(tokens), owner)
            return
        stored = stored_form(cache, self.kv)
        mx.eval(cache_arrays(stored))
        plan = self.index.insert(tokens, owner, cache_slots(stored))
        if plan is None:
            return
        for key in plan.dropped + plan.evicted + plan.spilled:
            self._leave_ram(key)
        if self.disk is not None:
            for key in plan.dropped + plan.evicted + plan.unsaved:
                self.disk.delete(key)
        if plan.in_ram:
            self.caches[plan.key] = stored
            self._ram_bytes[plan.key] = cache_bytes(stored)
            self.ram_bytes += self._ram_bytes[plan.key]
        if plan.on_disk and self.disk is not None:
            self.disk.write(plan.key, tokens, owner, stored)

    def _leave_ram(self, key: int) -> None:
        self.caches.pop(key, None)
        self.ram_bytes -= self._ram_bytes.pop(key, 0)

    def discard(self, tokens: int, owner: Owner) -> None:
        """A turn that is not kept (cancelled, failed): recorded so the digests compare it."""
        if self.enabled:
            self.index.discarded(tokens, kept_owner(owner))

    def clear(self) -> None:
        """Forget every entry, on disk too (the counters and the digest go on)."""
        self.index.clear()
        self.caches.clear()
        self._ram_bytes.clear()
        self.ram_bytes = 0
        if self.disk is not None:
            self.disk.delete_all()

    def close(self, timeout: float = 5.0) -> None:
        """Finish writing what is queued for disk (for at most `timeout` seconds)."""
        if self.disk is not None:
            self.disk.close(timeout)

    def stats(self) -> dict[str, int]:
        """The index's counters: the same on every rank."""
        return self.index.stats()

    def usage(self) -> dict[str, int]:
        """This rank's bytes in RAM and on disk (its own shard: they differ between ranks)."""
        disk_bytes = self.disk.bytes_held if self.disk is not None else 0
        return {"ram_bytes": self.ram_bytes, "disk_bytes": disk_bytes}
