"""A tensor split carried out: mlx-lm's `Model.shard` where the model has one, else the plan
`ringserve.model.splits.tensor_plan` found, on MLX's sharded linear layers."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ringserve.model.splits import TensorPlan


def _locate(model: nn.Module, path: str) -> tuple[Any, str]:
    """The container holding the module at `path` (a module or a list) and its key there."""
    *parents, key = path.split(".")
    container: Any = model
    for part in parents:
        container = container[int(part)] if isinstance(container, list) else container[part]
    return container, key


def _get(container: Any, key: str) -> Any:
    return container[int(key)] if isinstance(container, list) else container[key]


def _put(container: Any, key: str, value: Any) -> None:
    if isinstance(container, list):
        container[int(key)] = value
    else:
        setattr(container, key, value)


class _SummedAcrossRanks(nn.Module):
    """An experts block whose experts each rank holds a slice of: the slices' outputs add up."""

    def __init__(self, block: nn.Module, group: mx.distributed.Group) -> None:
        super().__init__()
        self.block = block
        self.group = group

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return mx.distributed.all_sum(self.block(*args, **kwargs), group=self.group)


class _CutRMSNorm(nn.Module):
    """An RMS norm over a projection each rank holds a slice of: the mean of squares is taken
    over the whole projection (one all_sum), each rank scaling its slice."""

    def __init__(self, norm: nn.Module, group: mx.distributed.Group) -> None:
        super().__init__()
        width = norm.weight.shape[-1]
        cut = width // group.size()
        self.weight = norm.weight[group.rank() * cut : (group.rank() + 1) * cut]
        self.eps = norm.eps
        self.width = width
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        squares = mx.sum(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True)
        mean = mx.distributed.all_sum(squares, group=self.group) / self.width
        return (x * mx.rsqrt(mean + self.eps).astype(x.dtype)) * self.weight


def apply_tensor_plan(model: nn.Module, plan: TensorPlan, group: mx.distributed.Group) -> None:
    if plan.own_shard:
        model.shard(group)
        return
    ranks, rank = group.size(), group.rank()
    for path in plan.divided:
        module, attribute = _locate(model, path)
        setattr(module, attribute, getattr(module, attribute) // ranks)
    for path in plan.sliced:
        module, name = _locate(model, path)
        whole = module[name]
        cut = whole.shape[0] // ranks
        module[name] = whole[rank * cut : (rank + 1) * cut]
    for shard in plan.shards:
        container, key = _locate(model, shard.path)
        segments = list(shard.segments) if isinstance(shard.segments, tuple) else shard.segments
        layer = _get(container, key)
        if shard.in_place:
            shard_inplace(layer, shard.sharding, segments=segments, group=group)
        else:
            _put(
                container, key, shard_linear(layer, shard.sharding, segments=segments, group=group)
            )
    for path in plan.unbiased:
        # Each rank's slice adds its part of the sum; the bias is added once, by rank 0.
        layer = _get(*_locate(model, path))
        if rank != 0:
            layer.bias = mx.zeros_like(layer.bias)
    for path in plan.norms:
        container, key = _locate(model, path)
        _put(container, key, _CutRMSNorm(_get(container, key), group))
    for path in plan.summed:
        container, key = _locate(model, path)
        _put(container, key, _SummedAcrossRanks(_get(container, key), group))
