"""Per-rank KV prefix cache: each rank keeps the KV of its own heads for reuse across turns.

What to reuse, store and evict is decided by PrefixIndex from broadcast data only, so every
rank holds the same entries. Stored caches are never generated into: a hit works on a copy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import (
    CacheList,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from ringserve.engine.prefix_index import Owner, PrefixIndex

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
    def __init__(self, model: nn.Module, budget_tokens: int = 0, shared: bool = False) -> None:
        self.model = model
        self.index = PrefixIndex(budget_tokens, shared)
        self.caches: dict[int, list[Any]] = {}

    @property
    def enabled(self) -> bool:
        return self.index.budget_tokens > 0

    def checkout(self, tokens: Sequence[int], owner: Owner) -> tuple[list[int], list[Any], int]:
        """The tokens still to prefill, a cache to generate into, and how many were reused."""
        match = self.index.lookup(tokens, owner) if self.enabled else None
        if match is None:
            return list(tokens), make_prompt_cache(self.model), 0
        stored = self.caches[match.key]
        surplus = len(self.index.entries[match.key].tokens) - match.reused
        if surplus and not can_trim_prompt_cache(stored):
            self.index.rejected(match)
            return list(tokens), make_prompt_cache(self.model), 0
        cache = copy.deepcopy(stored)
        if surplus:
            trim_prompt_cache(cache, surplus)
        return list(tokens[match.reused :]), cache, match.reused

    def store(self, tokens: Sequence[int], cache: list[Any], owner: Owner) -> None:
        """Keep a finished turn: its prompt and answer, exactly what its KV cache holds."""
        if not self.enabled:
            return
        if cache_length(cache) != len(tokens):
            log.warning(
                "not storing a turn: its cache holds %d of %d tokens",
                cache_length(cache),
                len(tokens),
            )
            self.index.discarded(len(tokens), owner)
            return
        plan = self.index.insert(tokens, owner, cache_slots(cache))
        if plan is None:
            return
        for key in plan.dropped + plan.evicted:
            del self.caches[key]
        self.caches[plan.key] = cache

    def discard(self, tokens: int, owner: Owner) -> None:
        """A turn that is not kept (cancelled, failed): recorded so the digests compare it."""
        if self.enabled:
            self.index.discarded(tokens, owner)

    def clear(self) -> None:
        """Forget every entry (the counters and the digest go on)."""
        self.index.clear()
        self.caches.clear()

    def stats(self) -> dict[str, int]:
        return self.index.stats()
