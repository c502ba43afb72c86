"""Joining the MLX group and loading the model across it: tensor-split, or as a pipeline of
layers in proportion to each rank's memory; mlx-lm loads, `model.splits` decides the cuts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import get_total_parameters, load_model, load_tokenizer

from ringserve.distributed.layer_files import (
    FileLayers,
    file_layers,
    files_for,
    read_weight_map,
    weight_file_names,
)
from ringserve.distributed.layer_split import (
    FileSizes,
    ModelSizes,
    combined,
    file_sizes,
    read_header,
)
from ringserve.distributed.layout import Layout, RankMemory, choose_layout
from ringserve.distributed.pipeline import (
    PipelinePlan,
    local_model_path,
    plan_pipeline,
    split_layers,
)
from ringserve.distributed.tensor import apply_tensor_plan
from ringserve.errors import LaunchError, MemoryCheckError, ModelUnavailableError
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
    parameters: int = 0  # elements in the checkpoint's tensors, whichever files this host holds


def load_lazily(model_path: str, trust_remote_code: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The model with its weights mapped but not read: what a rank does not keep is never read."""
    model, config = load_model(
        local_model_path(model_path),
        lazy=True,
        strict=False,
        trust_remote_code=trust_remote_code,
    )
    return model, config


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint's weight files and sizes as every rank sees them alike, though a pipeline
    host may hold only the files of its own layers."""

    directory: Path
    num_layers: int
    files: dict[str, FileLayers]
    sizes: ModelSizes
    parameters: int


def gather_checkpoint(
    group: mx.distributed.Group, model_path: str, config: dict[str, Any]
) -> Checkpoint:
    """Each file's sizes from the header of the copy some rank holds (one all_sum: holders
    add the same row, divided by their count), so every rank computes the same split."""
    directory = local_model_path(model_path)
    num_layers = int(config.get("text_config", config)["num_hidden_layers"])
    weight_map = read_weight_map(directory)
    names = weight_file_names(directory, weight_map)
    rows = np.zeros((len(names), num_layers + 3), dtype=np.int64)
    for row, name in enumerate(names):
        if (directory / name).is_file():
            with (directory / name).open("rb") as handle:
                sizes = file_sizes(read_header(handle), num_layers)
            rows[row] = [*sizes.layer_bytes, sizes.shared_bytes, sizes.elements, 1]
    # Without an index every host holds every file (nothing says which layers are where).
    if weight_map and group.size() > 1:
        summed = mx.distributed.all_sum(mx.array(rows), group=group, stream=mx.cpu)
        rows = np.array(summed, dtype=np.int64)
        holders = np.maximum(rows[:, -1:], 1)
        rows = rows // holders
    held = [
        FileSizes(tuple(int(v) for v in row[:num_layers]), int(row[-3]), int(row[-2]))
        for row in rows
        if row[-1]
    ]
    if not held:
        raise MemoryCheckError(f"no safetensors weights found in {directory}")
    return Checkpoint(
        directory=directory,
        num_layers=num_layers,
        files=file_layers(names, weight_map, num_layers),
        sizes=combined(held, num_layers),
        parameters=sum(f.elements for f in held),
    )


def plan_layout(
    model: nn.Module,
    config: dict[str, Any],
    checkpoint: Checkpoint,
    ranks: int,
    parallel: str,
    budgets: list[int] | None,
    pinned_split: tuple[int, ...] = (),
) -> LayoutPlan:
    """RINGSERVE_PARALLEL resolved for this model and these budgets (every rank's, the same on
    every rank; not needed for tensor), with the split checked against the budgets before any
    weight is read. `auto` takes the layout that works (tensor when the ranks are alike); a
    pinned split (RINGSERVE_PIPELINE_SPLIT) is a pipeline."""
    if ranks == 1:
        return LayoutPlan("single", parameters=checkpoint.parameters)
    choices = split_choices(model, config, ranks)
    refusal = layout_refusal(choices, "pipeline" if pinned_split else parallel)
    if refusal is not None:
        raise SplitRefused(refusal)
    if parallel != "tensor" and budgets is None:
        raise ValueError("a pipeline or auto layout needs every rank's budget")
    if pinned_split:
        layout: Layout = "pipeline"
    elif parallel == "tensor" or choices.pipeline_problem is not None:
        layout = "tensor"
    else:
        layout = choose_layout(parallel, budgets or [], choices.tensor is not None)
    if layout == "tensor":
        return LayoutPlan("tensor", tensor=choices.tensor, parameters=checkpoint.parameters)
    assert budgets is not None
    name = checkpoint.directory.name
    try:
        pipeline = plan_pipeline(checkpoint.sizes, budgets, name, pinned_split)
    except MemoryCheckError as exc:
        if parallel == "auto" and choices.tensor_problem is not None:
            raise MemoryCheckError(
                f"{choices.tensor_problem}; nor does a pipeline fit: {exc}"
            ) from exc
        raise
    return LayoutPlan("pipeline", pipeline=pipeline, parameters=checkpoint.parameters)


def check_files_held(
    group: mx.distributed.Group, checkpoint: Checkpoint, plan: LayoutPlan, model_path: str
) -> None:
    """Refuse, on every rank alike, when a rank's host lacks a weight file its layers need:
    loading goes on without the weights it does not find (strict=False), so a missing file
    would otherwise leave random weights in their place."""
    own = plan.pipeline.layers[group.rank()] if plan.pipeline is not None else None
    needed = files_for(checkpoint.files, own)
    missing = sorted(name for name in needed if not (checkpoint.directory / name).is_file())
    counts = [len(missing)]
    if group.size() > 1:
        mine = mx.zeros((group.size(),), dtype=mx.int64)
        mine[group.rank()] = len(missing)
        counts = mx.distributed.all_sum(mine, group=group, stream=mx.cpu).tolist()  # type: ignore[assignment]
    short = [rank for rank, count in enumerate(counts) if count]
    if not short:
        return
    if missing:
        layers = f"layers {own.start}-{own.stop - 1}" if own else "a share of every layer"
        raise ModelUnavailableError(
            f"model {model_path}: rank {group.rank()}'s host lacks {', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} in "
            f"{checkpoint.directory}, which its {layers} need; `launch.py start` copies a hub "
            "model's files to every host (a local directory must be complete on every host)"
        )
    raise ModelUnavailableError(
        f"model {model_path}: rank(s) {', '.join(map(str, short))} lack weight files their "
        "layers need (their logs name them)"
    )


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
    pinned_split: tuple[int, ...] = (),
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any], LayoutPlan]:
    """Load the model split across the group as RINGSERVE_PARALLEL and the budgets say (or as
    `pinned_split` says); `check_tensor_memory` runs before any weight is read when `auto`
    chose a tensor split."""
    model, config = load_lazily(model_path, trust_remote_code)
    checkpoint = gather_checkpoint(group, model_path, config)
    plan = plan_layout(model, config, checkpoint, group.size(), parallel, budgets, pinned_split)
    if plan.layout == "tensor" and parallel != "tensor" and check_tensor_memory is not None:
        check_tensor_memory()
    check_files_held(group, checkpoint, plan, model_path)
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
