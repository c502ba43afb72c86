"""A pipeline of whole layers for any mlx-lm decoder model: each rank runs a contiguous block of
layers, reads only their weights, and keeps the model's own forward pass.

Every rank keeps every layer's place. The layers another rank runs become `_Ghost`s: they hand
the hidden state on untouched and move their cache along as the real layer would (offsets,
padding, recurrent-state lengths), holding tiny placeholders instead of keys and values. So the
masks the model builds from any layer's cache, the caches it makes per layer type, and the
attributes it reads off its layers (sliding or full attention, linear or not) are the model's
own on every rank. The rank's own layers become `_Stage`s: the first receives the hidden state
from the rank running the layers before, the last sends its output on and gathers the final
hidden state, so every rank computes the same logits and samples the same token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models import cache as mlx_cache
from mlx_lm.utils import _download

from ringserve.distributed.layer_split import (
    ModelSizes,
    check_split,
    layer_ranges,
    pipeline_split,
    stage_bytes,
)
from ringserve.model.splits import decoder_layers, layers_holder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelinePlan:
    """What every rank runs: layers per rank (rank 0 first, the last layers) and the weight
    bytes each then holds."""

    split: tuple[int, ...]
    weight_bytes: tuple[int, ...]

    @property
    def layers(self) -> list[range]:
        return layer_ranges(self.split)


def plan_pipeline(
    sizes: ModelSizes, budgets: list[int], model_name: str, pinned: tuple[int, ...] = ()
) -> PipelinePlan:
    """The split for these budgets (or the one `pinned` gives, checked against them);
    MemoryCheckError names the ranks that cannot hold their share."""
    if pinned:
        check_split(sizes, pinned, budgets, model_name=model_name)
        split = list(pinned)
    else:
        split = pipeline_split(sizes, budgets, model_name=model_name)
    return PipelinePlan(tuple(split), tuple(stage_bytes(sizes, split)))


def local_model_path(model_path: str) -> Path:
    """A local directory as given; a hub repo id fetched by mlx-lm (every file)."""
    path: Path = _download(model_path)
    return path


def _layer_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The cache a layer was called with, wherever the model passes it."""
    found = kwargs.get("cache")
    if found is None:
        found = next((a for a in args if isinstance(a, mlx_cache._BaseCache)), None)
    return found


class _Delegating(nn.Module):
    """Reads the attributes a model expects of its layer (`use_sliding`, `is_linear`, ...) off
    the layer it stands for."""

    def _stands_for(self) -> nn.Module | None:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = None if name.startswith("_") else self._stands_for()
            if layer is None:  # still being built
                raise
            return getattr(layer, name)


class _Ghost(_Delegating):
    """A layer another rank runs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # The layer's weights go unread (a lazy load never reads them); its other attributes
        # stay readable, kept outside the module tree so they count as no parameters.
        layer.update(tree_map(lambda _: mx.zeros((0,)), layer.parameters()))
        object.__setattr__(self, "_layer", layer)

    def _stands_for(self) -> nn.Module | None:
        layer: nn.Module | None = self.__dict__.get("_layer")
        return layer

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = _layer_cache(args, kwargs)
        if cache is None:
            return x
        # The placeholders depend on nothing of another rank (a prefill chunk evaluates only
        # the caches, and must not reach a collective the other ranks skip), and the hidden
        # state depends on them, so they are computed with it rather than piling up unevaluated.
        return mx.depends(x, _advance(cache, x))


def _advance(cache: Any, x: mx.array) -> list[mx.array]:
    """Move `cache` along by the tokens of `x` as its layer would, without its contents."""
    batch, tokens = x.shape[0], x.shape[1]
    if isinstance(cache, mlx_cache.CacheList):
        return [a for c in cache.caches for a in _advance(c, x)]
    if isinstance(cache, mlx_cache.ArraysCache):
        for slot, value in enumerate(cache.cache):
            if value is None:
                cache[slot] = mx.zeros((batch, 1), x.dtype)
        cache.advance(tokens)
        return [a for a in (cache.lengths, cache.left_padding) if a is not None]
    # Quantized caches quantize along the last axis in groups.
    width = int(getattr(cache, "group_size", 1))
    placeholder = mx.zeros((batch, 1, tokens, width), x.dtype)
    keys, _ = cache.update_and_fetch(placeholder, placeholder)
    return [keys[0] if isinstance(keys, tuple) else keys]


class _Stage(_Delegating):
    """One of the rank's own layers, with the pipeline's traffic around it."""

    def __init__(
        self, layer: nn.Module, group: mx.distributed.Group, first: bool, last: bool
    ) -> None:
        super().__init__()
        self.layer = layer
        self.group = group
        self.first = first
        self.last = last

    def _stands_for(self) -> nn.Module | None:
        layer: nn.Module | None = self.get("layer")
        return layer

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        rank, size = self.group.rank(), self.group.size()
        if self.first and rank < size - 1:
            x = mx.distributed.recv_like(x, rank + 1, group=self.group)
        h: mx.array = self.layer(x, *args, **kwargs)
        if not self.last:
            return h
        if rank != 0:
            h = mx.distributed.send(h, rank - 1, group=self.group)
            # A prefill chunk evaluates only the caches: the send must happen then too.
            _tie(_layer_cache(args, kwargs), h)
        return mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]


def _tie(cache: Any, h: mx.array) -> None:
    """Make `cache`'s contents depend on `h`, so evaluating the cache evaluates `h`."""
    if isinstance(cache, mlx_cache.CacheList):
        _tie(cache.caches[0], h)
    elif isinstance(cache, mlx_cache.ArraysCache):
        if cache.cache[0] is not None:
            cache[0] = mx.depends(cache.cache[0], h)
    elif cache is not None and getattr(cache, "keys", None) is not None:
        if isinstance(cache.keys, tuple):  # quantized: (data, scales, biases)
            cache.keys = (mx.depends(cache.keys[0], h), *cache.keys[1:])
        else:
            cache.keys = mx.depends(cache.keys, h)


def split_layers(model: nn.Module, group: mx.distributed.Group, split: list[int]) -> None:
    """Make this rank's layers stages and the others ghosts, in the model's own list."""
    layers = decoder_layers(model)
    holder = layers_holder(model, layers) if layers is not None else None
    if layers is None or holder is None:
        raise ValueError("the model has no layers list a pipeline can split")
    own = layer_ranges(split)[group.rank()]
    held: list[nn.Module] = holder["layers"]
    for index, layer in enumerate(held):
        if index in own:
            first, last = index == own.start, index == own.stop - 1
            held[index] = _Stage(layer, group, first, last)
        else:
            held[index] = _Ghost(layer)
