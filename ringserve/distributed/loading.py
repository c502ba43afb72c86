"""Joining the MLX group and loading the model across it with mlx-lm: tensor-sharded, or as a
pipeline of layers in proportion to each rank's memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import get_total_parameters, sharded_load

from ringserve.distributed.layout import Layout, RankMemory, choose_layout
from ringserve.distributed.pipeline import (
    PipelinePlan,
    load_pipelined,
    local_model_path,
    plan_pipeline,
)
from ringserve.errors import LaunchError, MemoryCheckError, ModelError
from ringserve.model.source import check_divisible

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


def local_config(model_path: str) -> dict[str, Any] | None:
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    config: dict[str, Any] = json.loads(config_file.read_text())
    return config


def divides(config: dict[str, Any], ranks: int) -> bool:
    try:
        check_divisible(config, ranks)
    except ModelError:
        return False
    return True


def every_rank_holds(group: mx.distributed.Group, holds: bool) -> bool:
    """Whether `holds` is true on every rank (one all_sum): a decision all ranks then share."""
    count = mx.distributed.all_sum(mx.array(int(holds)), group=group, stream=mx.cpu)
    return bool(count.item() == group.size())


def plain_kv_caches(model: nn.Module) -> bool:
    """Whether every cache of this rank's layers is a plain KVCache (trimmable, one length)."""
    return all(type(cache) is KVCache for cache in make_prompt_cache(model))


def gather_memory(group: mx.distributed.Group, own: RankMemory) -> list[RankMemory]:
    """Every rank's report of itself, on every rank (one all_sum)."""
    rows = mx.zeros((group.size(), 3), dtype=mx.int64)
    rows[group.rank()] = mx.array([own.host_index, own.free, int(own.own_device)], mx.int64)
    gathered: list[list[int]] = mx.distributed.all_sum(rows, group=group, stream=mx.cpu).tolist()  # type: ignore[assignment]
    return [RankMemory(host, free, bool(own_device)) for host, free, own_device in gathered]


def plan_layout(
    model_path: str, ranks: int, parallel: str, budgets: list[int] | None
) -> tuple[Layout, PipelinePlan | None]:
    """RINGSERVE_PARALLEL resolved for this model and these budgets (every rank's, the same on
    every rank; not needed for tensor), and a pipeline's split, checked against the budgets
    before any weight is read."""
    if ranks == 1:
        return "single", None
    if parallel == "tensor":
        return "tensor", None
    if budgets is None:
        raise ValueError("a pipeline or auto layout needs every rank's budget")
    path = local_model_path(model_path)
    config = json.loads((path / "config.json").read_text())
    fits_tensor = divides(config, ranks)
    layout = choose_layout(parallel, budgets, fits_tensor)
    if layout != "pipeline":
        return layout, None
    try:
        return layout, plan_pipeline(path, budgets)
    except MemoryCheckError as exc:
        if parallel != "auto" or fits_tensor:
            raise
        try:
            check_divisible(config, ranks)
        except ModelError as tensor:
            raise MemoryCheckError(f"{tensor}; nor does a pipeline fit: {exc}") from exc
        raise


def load_model(
    model_path: str,
    group: mx.distributed.Group,
    plan: PipelinePlan | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Load the model tensor-sharded, or as the pipeline `plan` splits it."""
    if plan is not None:
        return load_pipelined(local_model_path(model_path), group, plan, trust_remote_code)
    return _load_tensor(model_path, group, local_config(model_path), trust_remote_code)


def _load_tensor(
    model_path: str,
    group: mx.distributed.Group,
    checked: dict[str, Any] | None,
    trust_remote_code: bool,
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    # A local model is checked before its weights are read; a hub model once it has arrived.
    if checked is not None:
        check_divisible(checked, group.size())
    if group.size() == 1:
        model, tokenizer, config = load(  # type: ignore[misc]
            model_path, return_config=True, trust_remote_code=trust_remote_code
        )
    else:
        model, tokenizer, config = sharded_load(
            model_path,
            tensor_group=group,
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    if checked is None:
        check_divisible(config, group.size())
    log.info(
        "loaded %s on rank %d/%d (%d parameters on this rank)",
        model_path,
        group.rank(),
        group.size(),
        get_total_parameters(model),
    )
    return model, tokenizer, config


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
