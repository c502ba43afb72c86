"""Joining the MLX group and loading the model across it: tensor-split, or as a pipeline of
layers in proportion to each rank's memory; mlx-lm loads, `model.splits` decides the cuts."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import get_total_parameters, load_model, load_tokenizer

from ringserve.distributed.layout import Layout, RankMemory, choose_layout
from ringserve.distributed.pipeline import (
    PipelinePlan,
    local_model_path,
    plan_pipeline,
    split_layers,
)
from ringserve.distributed.tensor import apply_tensor_plan
from ringserve.errors import LaunchError, MemoryCheckError
from ringserve.model.splits import SplitRefused, TensorPlan, layout_refusal, split_choices

log = logging.getLogger(__name__)


def join_group(backend: str, world_size: int) -> mx.distributed.Group:
    if world_size == 1:
        return mx.distributed.init()
    group = mx.distributed.init(backend=backend, strict=True)
    if group.size() != world_size:
        raise LaunchError(
            f"joined a group of {group.size()} ranks, expected {world_size} "
            "(check MLX_HOSTFILE and the host list)"
        )
    return group


def gather_memory(group: mx.distributed.Group, own: RankMemory) -> list[RankMemory]:
    """Every rank's report of itself, on every rank (one all_sum)."""
    rows = mx.zeros((group.size(), 3), dtype=mx.int64)
    rows[group.rank()] = mx.array([own.host_index, own.free, int(own.own_device)], mx.int64)
    gathered: list[list[int]] = mx.distributed.all_sum(rows, group=group, stream=mx.cpu).tolist()  # type: ignore[assignment]
    return [RankMemory(host, free, bool(own_device)) for host, free, own_device in gathered]


@dataclass(frozen=True)
class LayoutPlan:
    """How the ranks split the model: the layout, and its plan (a pipeline's layers per rank,
    or a tensor split's cuts)."""

    layout: Layout
    pipeline: PipelinePlan | None = None
    tensor: TensorPlan | None = None


def load_lazily(model_path: str, trust_remote_code: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The model with its weights mapped but not read: what a rank does not keep is never read."""
    model, config = load_model(
        local_model_path(model_path),
        lazy=True,
        strict=False,
        trust_remote_code=trust_remote_code,
    )
    return model, config


def plan_layout(
    model: nn.Module,
    config: dict[str, Any],
    model_path: str,
    ranks: int,
    parallel: str,
    budgets: list[int] | None,
) -> LayoutPlan:
    """RINGSERVE_PARALLEL resolved for this model and these budgets (every rank's, the same on
    every rank; not needed for tensor), with the split checked against the budgets before any
    weight is read. `auto` takes the layout that works (tensor when the ranks are alike)."""
    if ranks == 1:
        return LayoutPlan("single")
    choices = split_choices(model, config, ranks)
    refusal = layout_refusal(choices, parallel)
    if refusal is not None:
        raise SplitRefused(refusal)
    if parallel != "tensor" and budgets is None:
        raise ValueError("a pipeline or auto layout needs every rank's budget")
    layout = (
        "tensor"
        if parallel == "tensor" or choices.pipeline_problem is not None
        else choose_layout(parallel, budgets or [], choices.tensor is not None)
    )
    if layout == "tensor":
        return LayoutPlan("tensor", tensor=choices.tensor)
    assert budgets is not None
    try:
        return LayoutPlan("pipeline", pipeline=plan_pipeline(local_model_path(model_path), budgets))
    except MemoryCheckError as exc:
        if parallel == "auto" and choices.tensor_problem is not None:
            raise MemoryCheckError(
                f"{choices.tensor_problem}; nor does a pipeline fit: {exc}"
            ) from exc
        raise


def split_model(model: nn.Module, plan: LayoutPlan, group: mx.distributed.Group) -> None:
    """Cut the lazily loaded model as planned, then read this rank's weights (every rank has
    read its own before the first step, as mlx-lm's sharded_load)."""
    if plan.tensor is not None:
        apply_tensor_plan(model, plan.tensor, group)
    elif plan.pipeline is not None:
        split_layers(model, group, list(plan.pipeline.split))
    mx.eval(model.parameters())
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def load_split_model(
    model_path: str,
    group: mx.distributed.Group,
    parallel: str,
    budgets: list[int] | None,
    trust_remote_code: bool = False,
    check_tensor_memory: Callable[[], None] | None = None,
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any], LayoutPlan]:
    """Load the model split across the group as RINGSERVE_PARALLEL and the budgets say;
    `check_tensor_memory` runs before any weight is read when `auto` chose a tensor split."""
    model, config = load_lazily(model_path, trust_remote_code)
    plan = plan_layout(model, config, model_path, group.size(), parallel, budgets)
    if plan.layout == "tensor" and parallel != "tensor" and check_tensor_memory is not None:
        check_tensor_memory()
    split_model(model, plan, group)
    tokenizer = load_tokenizer(
        local_model_path(model_path),
        {"trust_remote_code": True} if trust_remote_code else None,
        eos_token_ids=config.get("eos_token_id", None),
    )
    _log_split(model_path, group, plan, model)
    return model, tokenizer, config, plan


def _log_split(
    model_path: str, group: mx.distributed.Group, plan: LayoutPlan, model: nn.Module
) -> None:
    rank, size = group.rank(), group.size()
    if plan.pipeline is not None:
        layers = plan.pipeline.layers[rank]
        log.info(
            "pipeline rank %d/%d: layers %d-%d of %d",
            rank,
            size,
            layers.start,
            layers.stop - 1,
            sum(plan.pipeline.split),
        )
        return
    how = ""
    if plan.tensor is not None:
        how = " (mlx-lm's shard)" if plan.tensor.own_shard else " (cut by its blocks' shapes)"
    log.info(
        "loaded %s on rank %d/%d%s (%d parameters on this rank)",
        model_path,
        rank,
        size,
        how,
        get_total_parameters(model),
    )


def count_parameters(model_path: str) -> int:
    """Elements in the checkpoint's tensors, read from the safetensors headers (no weights)."""
    total = 0
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with file.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total
