"""Loading the model as a pipeline: each rank runs a contiguous block of layers and reads only
their weights.

Models with mlx-lm's `PipelineMixin` (qwen2, qwen3_moe, deepseek, ...) split themselves. Any
other model whose `model.layers` run one after another (llama, qwen3) gets the same behaviour
from `_Stage`, which wraps a rank's first and last layers with what the mixin's `__call__`
does around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _download, load_config, load_model, load_tokenizer

from ringserve.distributed.layer_split import (
    ModelSizes,
    layer_ranges,
    model_sizes,
    pipeline_split,
    stage_bytes,
)
from ringserve.errors import LaunchError

log = logging.getLogger(__name__)

# Models `_Stage` was checked on (their layers run alike whatever their place). Others without
# mlx-lm's mixin may choose a layer's attention or cache by its index (gemma3, gpt_oss), which a
# rank holding later layers would get wrong without an error: they are refused.
STAGED_MODEL_TYPES = frozenset({"qwen3", "llama"})


@dataclass(frozen=True)
class PipelinePlan:
    """What every rank runs: layers per rank (rank 0 first, the last layers) and the weight
    bytes each then holds."""

    split: tuple[int, ...]
    weight_bytes: tuple[int, ...]

    @property
    def layers(self) -> list[range]:
        return layer_ranges(self.split)


def plan_pipeline(model_path: Path, budgets: list[int]) -> PipelinePlan:
    """The split for these budgets, from the checkpoint's headers; MemoryCheckError names the
    ranks that cannot hold their share."""
    config = load_config(model_path)
    text_config = config.get("text_config", config)
    sizes: ModelSizes = model_sizes(model_path, int(text_config["num_hidden_layers"]))
    split = pipeline_split(sizes, budgets, model_name=model_path.name)
    return PipelinePlan(tuple(split), tuple(stage_bytes(sizes, split)))


def local_model_path(model_path: str) -> Path:
    """A local directory as given; a hub repo id fetched by mlx-lm (every file)."""
    path: Path = _download(model_path)
    return path


class _Stage(nn.Module):
    """One of a rank's layers, with the pipeline's traffic around it: the rank's first layer
    receives the hidden state from the rank that runs the layers before (the next higher
    rank), its last sends its output on to the next lower rank, and gathers rank 0's output
    (the last layer's) so every rank computes the same logits and samples the same token."""

    def __init__(
        self, layer: nn.Module, group: mx.distributed.Group, first: bool, last: bool
    ) -> None:
        super().__init__()
        self.layer = layer
        self.group = group
        self.first = first
        self.last = last

    def __getattr__(self, name: str) -> Any:
        # The model reads its layers' own attributes (llama's `use_sliding`): the wrapped one's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer" or "layer" not in self:  # still being built
                raise
            return getattr(self["layer"], name)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None, **kwargs: Any) -> mx.array:
        rank, size = self.group.rank(), self.group.size()
        if self.first and rank < size - 1:
            x = mx.distributed.recv_like(x, rank + 1, group=self.group)
        h: mx.array = self.layer(x, mask, cache, **kwargs)
        if not self.last:
            return h
        if rank != 0:
            h = mx.distributed.send(h, rank - 1, group=self.group)
            # A prefill chunk evaluates only the cache: the send must happen then too.
            if getattr(cache, "keys", None) is not None:
                cache.keys = mx.depends(cache.keys, h)
        return mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]


def pipeline_layers(inner: nn.Module, group: mx.distributed.Group, split: list[int]) -> None:
    """Keep only this rank's layers in `inner.layers`, wrapped as stages; the others' (lazy)
    weights are dropped unread."""
    own = layer_ranges(split)[group.rank()]
    layers = [inner.layers[i] for i in own]
    inner.layers = [
        _Stage(layer, group, first=i == 0, last=i == len(layers) - 1)
        for i, layer in enumerate(layers)
    ]


def load_pipelined(
    model_path: Path,
    group: mx.distributed.Group,
    plan: PipelinePlan,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Load lazily, keep this rank's layers, and only then read their weights."""
    model, config = load_model(
        model_path, lazy=True, strict=False, trust_remote_code=trust_remote_code
    )
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), list):
        raise LaunchError(
            f"{model_path.name} has no `model.layers` to split into a pipeline; "
            "use RINGSERVE_PARALLEL=tensor"
        )
    split = list(plan.split)
    if hasattr(inner, "pipeline"):
        inner.pipeline(group, split)
    else:
        model_type = config.get("model_type")
        sliding = any(getattr(layer, "use_sliding", False) for layer in inner.layers)
        if model_type not in STAGED_MODEL_TYPES or sliding:
            raise LaunchError(
                f"{model_path.name} ({model_type}) has no pipeline in mlx-lm, and its layers "
                "may depend on their place; use RINGSERVE_PARALLEL=tensor"
            )
        pipeline_layers(inner, group, split)
    mx.eval(model.parameters())
    # Every rank has read its weights before the first step (as mlx-lm's sharded_load).
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    tokenizer = load_tokenizer(
        model_path,
        {"trust_remote_code": True} if trust_remote_code else None,
        eos_token_ids=config.get("eos_token_id", None),
    )
    layers = plan.layers[group.rank()]
    log.info(
        "pipeline rank %d/%d: layers %d-%d of %d (%s)",
        group.rank(),
        group.size(),
        layers.start,
        layers.stop - 1,
        sum(plan.split),
        "mlx-lm's pipeline" if hasattr(inner, "pipeline") else "generic stages",
    )
    return model, tokenizer, config
