"""Tiny random-weight models of the families users bring, built from each family's own mlx-lm
classes (`ModelArgs`, `Model`) with the demo model's tokenizer: a few layers, every block shape
of the real thing (grouped KV heads, sliding windows, mixtures of experts, fused projections,
hybrid convolution and linear-attention layers).

Dimensions divide by 2 ranks (heads, KV heads, MLP width, experts) and by the quantization
group, so every family can be tried as a tensor split and quantized.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

from ringserve.model.demo import ensure_demo_model

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
MLP = 128
LAYERS = 4
WINDOW = 12  # sliding windows shorter than the tests' prompts, so they rotate
QUANT_GROUP = 32

_COMMON: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "intermediate_size": MLP,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
_MOE: dict[str, Any] = {
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
}
_SLIDING_TYPES = ["sliding_attention", "full_attention"] * (LAYERS // 2)

# What each family adds to (or overrides in) the common configuration.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW, "layer_types": _SLIDING_TYPES},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {
        **_MOE,
        "num_experts": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "norm_topk_prob": True,
    },
    "deepseek_v3": {
        **_MOE,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "num_key_value_heads": HEADS,
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
    },
    "glm4_moe": {
        **_MOE,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "use_qk_norm": True,
        "attention_bias": False,
        "partial_rotary_factor": 0.5,
        "rope_scaling": None,
    },
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
        "layer_types": _SLIDING_TYPES,
    },
    "minimax": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 0,
        "rotary_dim": HEAD_DIM // 2,
        "use_qk_norm": True,
    },
    "qwen3_next": {
        **_MOE,
        "num_experts": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "shared_expert_intermediate_size": 64,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
        "partial_rotary_factor": 0.5,
        "norm_topk_prob": True,
    },
    "gemma3_text": {
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": HEAD_DIM,
        "rope_local_base_freq": 10000.0,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phi3": {},
    "olmo2": {},
    "granite": {
        "logits_scaling": 2.0,
        "attention_multiplier": HEAD_DIM**-0.5,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "smollm3": {"no_rope_layer_interval": 2},
    "lfm2": {
        "norm_eps": 1e-6,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": HIDDEN,
        "block_multiple_of": 32,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "block_ff_dim": MLP,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
}


# Widths that grow with `scale` (heads and layers stay as they are).
_WIDTHS = (
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "block_dim",
    "block_ff_dim",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "query_pre_attn_scalar",
    "rotary_dim",
)


def family_config(
    family: str, vocab_size: int, eos_token_id: int, scale: int = 1
) -> dict[str, Any]:
    """The family's configuration; `scale` multiplies every width (benchmarks use 8)."""
    config = {
        "model_type": family,
        **_COMMON,
        **FAMILIES[family],
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "pad_token_id": None,
    }
    for key in _WIDTHS:
        if isinstance(config.get(key), int | float):
            config[key] *= scale
    return config


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    """Inputs each output of a weight sums over (a convolution's kernel counts too)."""
    if "conv" in name:
        return int(np.prod(shape[1:]))
    return shape[-1]


def randomize(model: nn.Module, seed: int) -> None:
    """Every matrix drawn anew at a scale that keeps greedy decoding varied (as the demo
    model's weights); vectors (norms, biases, decay rates) keep the family's own start."""
    rng = np.random.default_rng(seed)
    params = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    drawn = []
    for name, param in sorted(params):
        shape = tuple(param.shape)
        if len(shape) < 2:
            continue
        embedding = name.endswith(("embed_tokens.weight", "lm_head.weight"))
        std = 1.0 if embedding else 2.0 * _fan_in(name, shape) ** -0.5
        drawn.append((name, mx.array(rng.standard_normal(shape, dtype=np.float32) * std)))
    model.load_weights(drawn, strict=False)


def build_family_model(
    family: str,
    out_dir: Path,
    tokenizer_dir: Path,
    bits: int | None = None,
    mixed: bool = False,
    seed: int = 0,
    scale: int = 1,
) -> Path:
    """A model of `family` in mlx-lm's format at `out_dir`, with `tokenizer_dir`'s tokenizer;
    quantized to `bits` (with `mixed`, the attention projections at 8 bits and the rest at
    `bits`, as per-layer entries in config.json)."""
    demo = json.loads((tokenizer_dir / "config.json").read_text())
    config = family_config(family, demo["vocab_size"], demo["eos_token_id"], scale)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    randomize(model, seed)
    if bits is not None:

        def per_layer(path: str, module: nn.Module) -> bool | dict[str, int]:
            if mixed and path.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                return {"group_size": QUANT_GROUP, "bits": 8}
            return True

        model, config = quantize_model(
            model, config, QUANT_GROUP, bits, quant_predicate=per_layer if mixed else None
        )
    out_dir.mkdir(parents=True)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    for file in tokenizer_dir.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, out_dir / file.name)
    return out_dir


@dataclass(frozen=True)
class Variant:
    """A family's model as the tests serve it: full precision, or quantized."""

    family: str
    bits: int | None = None
    mixed: bool = False  # attention at 8 bits, the rest at `bits`, per layer in config.json
    scale: int = 1  # every width times this (2: heads 32 wide, which KV quantization takes)

    @property
    def name(self) -> str:
        name = self.family if self.scale == 1 else f"{self.family}-x{self.scale}"
        if self.bits is None:
            return name
        return f"{name}-{self.bits}bit" + ("-mixed" if self.mixed else "")


def family_model(models_dir: Path, variant: Variant) -> Path:
    """The variant's model under `models_dir`, built on first use."""
    out_dir = models_dir / "families" / variant.name
    if not out_dir.is_dir():
        tokenizer_dir = ensure_demo_model(models_dir, "tiny")
        building = out_dir.with_name(f".{variant.name}.building")
        shutil.rmtree(building, ignore_errors=True)
        build_family_model(
            variant.family,
            building,
            tokenizer_dir,
            variant.bits,
            variant.mixed,
            scale=variant.scale,
        )
        building.rename(out_dir)
    return out_dir
