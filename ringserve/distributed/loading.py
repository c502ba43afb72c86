"""Joining the MLX group and loading the model tensor-sharded across it, with mlx-lm."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import get_total_parameters, sharded_load

from ringserve.errors import LaunchError
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


def load_model(
    model_path: str, group: mx.distributed.Group, trust_remote_code: bool = False
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    # A local model is checked before its weights are read; a hub model once it has arrived.
    checked = local_config(model_path)
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
