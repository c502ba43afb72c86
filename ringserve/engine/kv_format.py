"""How the prefix cache keeps KV state: as the model computed it, or quantized with mlx-lm's
`QuantizedKVCache` (`KVCache.to_quantized`).

mlx-lm's BatchGenerator merges the caches of its sequences with each cache type's `merge`, and
`QuantizedKVCache` has none, so running sequences keep full precision: what is quantized is
what the prefix cache stores, and a hit gets a dequantized copy to generate into.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import CacheList, KVCache, QuantizedKVCache


@dataclass(frozen=True)
class KvFormat:
    bits: int = 0  # 0: as the model computes it
    group_size: int = 64

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def name(self) -> str:
        return f"q{self.bits}g{self.group_size}" if self.quantized else "model"

    def fits(self, width: int) -> bool:
        """Whether keys or values `width` wide quantize in this format's groups."""
        return width % self.group_size == 0


def _layers(cache: Iterable[Any]) -> Iterable[Any]:
    for layer in cache:
        yield from layer.caches if isinstance(layer, CacheList) else (layer,)


def _widths(layer: Any) -> tuple[int, int]:
    return int(layer.keys.shape[-1]), int(layer.values.shape[-1])


def unfit_widths(cache: list[Any], kv: KvFormat) -> list[int]:
    """The KV widths (head dims) of `cache`'s attention layers that `kv` cannot quantize. A
    pipeline's layers of other ranks hold placeholders one wide: they are kept as they are."""
    if not kv.quantized:
        return []
    found: set[int] = set()
    for layer in _layers(cache):
        if type(layer) is KVCache and layer.keys is not None:
            found.update(w for w in _widths(layer) if w > 1 and not kv.fits(w))
    return sorted(found)


def stored_form(cache: list[Any], kv: KvFormat) -> list[Any]:
    """The cache as the prefix cache keeps it: plain KV layers cut to the tokens they hold, and
    quantized when `kv` says so (other layer types, and placeholders, as they are)."""
    return [_stored_layer(layer, kv) for layer in cache]


def _stored_layer(layer: Any, kv: KvFormat) -> Any:
    if isinstance(layer, CacheList):
        return CacheList(*(_stored_layer(part, kv) for part in layer.caches))
    if type(layer) is not KVCache or layer.keys is None:
        return layer
    keys: Any = layer.keys
    if keys.shape[-2] > layer.offset:
        cut = KVCache()
        cut.keys = mx.contiguous(keys[..., : layer.offset, :])
        cut.values = mx.contiguous(layer.values[..., : layer.offset, :])  # type: ignore[index]
        cut.offset = layer.offset
        layer = cut
    if kv.quantized and all(kv.fits(w) for w in _widths(layer)):
        return layer.to_quantized(group_size=kv.group_size, bits=kv.bits)
    return layer


def working_copy(stored: list[Any]) -> list[Any]:
    """A cache to generate into from a stored one: quantized layers dequantized, the others
    copied, so nothing done to it reaches the stored entry."""
    return [_working_layer(layer) for layer in stored]


def _working_layer(layer: Any) -> Any:
    if isinstance(layer, CacheList):
        return CacheList(*(_working_layer(part) for part in layer.caches))
    if not isinstance(layer, QuantizedKVCache) or layer.keys is None:
        return copy.deepcopy(layer)
    plain = KVCache()
    plain.keys = mx.dequantize(*layer.keys, group_size=layer.group_size, bits=layer.bits)
    plain.values = mx.dequantize(*layer.values, group_size=layer.group_size, bits=layer.bits)
    plain.offset = layer.offset
    return plain


def cache_arrays(cache: list[Any]) -> list[mx.array]:
    """Every array a cache holds (to evaluate it, or count its bytes)."""
    found: list[mx.array] = []

    def walk(value: Any) -> None:
        if isinstance(value, mx.array):
            found.append(value)
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)

    for layer in _layers(cache):
        walk(layer.state)
    return found


def cache_bytes(cache: list[Any]) -> int:
    return sum(array.nbytes for array in cache_arrays(cache))
