"""How a model's structure lets it be split: the plans found for real mlx-lm classes (built from
config alone, no weights), the pipeline's check of a forward pass, and the refusal lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.nn as nn
import pytest

from ringserve.model.splits import (
    SplitChoices,
    SplitRefused,
    check_splittable,
    layout_refusal,
    model_skeleton,
    pipeline_problem,
    runs_layers_in_a_chain,
    split_choices,
    tensor_plan,
)
from tests.families import FAMILIES, family_config

VOCAB, EOS = 1024, 1


def skeleton(family: str, **overrides: object) -> tuple[nn.Module, dict[str, Any]]:
    config = {**family_config(family, VOCAB, EOS), **overrides}
    return model_skeleton(Path("."), config, trust_remote_code=False), config


def test_every_family_can_be_split_into_a_pipeline() -> None:
    for family in FAMILIES:
        model, _ = skeleton(family)
        assert pipeline_problem(model, family, 2) is None, family


def test_blocks_without_mlx_lms_shard_are_cut_by_their_shapes() -> None:
    model, config = skeleton("phi3")
    plan = tensor_plan(model, config, 2)
    assert not plan.own_shard
    cuts = {shard.path: shard for shard in plan.shards}
    qkv = cuts["model.layers.0.self_attn.qkv_proj"]
    # Fused q, k, v are cut part by part: 4 query heads and 2 KV heads of 16.
    assert qkv.sharding == "all-to-sharded" and qkv.segments == (64, 96)
    assert cuts["model.layers.0.mlp.gate_up_proj"].segments == 2
    assert cuts["model.layers.0.mlp.down_proj"].sharding == "sharded-to-all"
    assert "model.layers.0.self_attn.n_heads" in plan.divided

    model, config = skeleton("olmo2")
    plan = tensor_plan(model, config, 2)
    # olmo2 normalises the whole query and key projections: computed across ranks.
    assert "model.layers.3.self_attn.q_norm" in plan.norms
    assert "model.layers.3.self_attn.k_norm" in plan.norms

    model, config = skeleton("gemma3_text")
    plan = tensor_plan(model, config, 2)
    assert plan.norms == []  # per-head norms stay whole

    model, config = skeleton("mixtral")
    plan = tensor_plan(model, config, 2)
    assert "model.layers.0.block_sparse_moe" in plan.summed
    experts = cuts = {shard.path: shard for shard in plan.shards}
    switch = "model.layers.0.block_sparse_moe.switch_mlp"
    assert experts[f"{switch}.down_proj"].in_place and experts[f"{switch}.gate_proj"].in_place
    assert "model.layers.0.block_sparse_moe.gate" not in cuts  # the router stays whole


def test_mlx_lms_own_shard_comes_first() -> None:
    model, config = skeleton("qwen3")
    assert tensor_plan(model, config, 2).own_shard


def test_what_does_not_divide_is_refused_naming_it() -> None:
    model, config = skeleton("gemma3_text")
    with pytest.raises(SplitRefused, match=r"self_attn\.n_heads = 4 does not divide"):
        tensor_plan(model, config, 3)
    model, config = skeleton("qwen3")
    with pytest.raises(SplitRefused, match="num_attention_heads=4 does not divide"):
        tensor_plan(model, config, 3)
    model, config = skeleton("phi3", quantization={"group_size": 64, "bits": 4})
    with pytest.raises(SplitRefused, match="does not fill its quantization groups of 64"):
        tensor_plan(model, config, 2)


def test_recurrent_hybrids_are_refused_a_tensor_split_pointing_at_the_pipeline() -> None:
    for family in ("lfm2", "qwen3_next"):
        model, config = skeleton(family)
        choices = split_choices(model, config, 2)
        assert choices.tensor is None and choices.pipeline_problem is None
        refusal = layout_refusal(choices, "tensor")
        assert refusal == (
            f"{family} cannot be split by heads over 2 ranks: its layers keep a recurrent state "
            "(ArraysCache), which is not split by heads; use RINGSERVE_PARALLEL=pipeline (or auto)"
        )
        assert layout_refusal(choices, "auto") is None
        assert layout_refusal(choices, "pipeline") is None


def test_a_refusal_points_only_at_a_layout_that_works() -> None:
    both = SplitChoices(None, "x cannot be split by heads: a", "x cannot be split into a pipeline")
    assert layout_refusal(both, "tensor") == (
        "x cannot be split by heads: a; x cannot be split into a pipeline; "
        "it can be served on one rank only"
    )
    assert layout_refusal(both, "auto") == layout_refusal(both, "pipeline")
    no_pipeline = SplitChoices(None, None, "x cannot be split into a pipeline: b")
    assert layout_refusal(no_pipeline, "pipeline") == (
        "x cannot be split into a pipeline: b; use RINGSERVE_PARALLEL=tensor (or auto)"
    )


class Chained:
    layers: tuple[Any, ...] = ()

    def __call__(self, x: Any, cache: Any = None) -> Any:
        h = x
        for _, (layer, c) in enumerate(zip(self.layers, cache, strict=True)):
            h = layer(h, None, cache=c)
        return h


class TwoStates:
    layers: tuple[Any, ...] = ()

    def __call__(self, x: Any, cache: Any = None) -> Any:
        h, residual = x, None
        for layer in self.layers:
            h, residual = layer(h, residual)
        return h


class Skips:
    layers: tuple[Any, ...] = ()

    def __call__(self, x: Any, cache: Any = None) -> Any:
        h = first = x
        for layer in self.layers:
            out = layer(h)
            h = out + first
        return h


def test_the_pipeline_follows_only_a_chain_of_layers() -> None:
    assert runs_layers_in_a_chain(Chained)
    assert not runs_layers_in_a_chain(TwoStates)
    assert not runs_layers_in_a_chain(Skips)


CUSTOM_MODEL = """
from dataclasses import dataclass
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.mixer = nn.Conv1d(args.hidden_size, args.hidden_size, 3)

    def __call__(self, x, state):
        return self.mixer(x), state


class Inner(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, x, cache=None):
        state = None
        for layer in self.layers:
            x, state = layer(x, state)
        return x


class Model(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.model = Inner(args)

    def __call__(self, x, cache=None):
        return self.model(x, cache)

    @property
    def layers(self):
        return self.model.layers
"""


def test_a_model_neither_layout_can_split_is_refused_at_start_in_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "custom.py").write_text(CUSTOM_MODEL)
    config = {
        "model_type": "custom",
        "model_file": "custom.py",
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "vocab_size": 16,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SplitRefused) as refused:
        check_splittable(tmp_path, config, 2, "auto", trust_remote_code=True)
    assert str(refused.value) == (
        "custom cannot be split by heads over 2 ranks: model.layers.0.mixer (Conv1d) is not "
        "part of an attention, MLP or experts block; custom cannot be split into a pipeline: "
        "its forward pass does not run `layers` one after another, each on the hidden state "
        "the one before returned; it can be served on one rank only"
    )
    check_splittable(tmp_path, config, 1, "auto", trust_remote_code=True)  # one rank: whole
