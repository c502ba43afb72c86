"""How a model's structure lets it be split across ranks, read off mlx-lm's own classes for it.

Tensor: mlx-lm's `Model.shard` where the model has one; otherwise a plan found from what the
decoder layers' modules are (attention with q/k/v/o or fused qkv projections, gated or plain
MLPs, mixtures of experts with switch layers), not from a list of model names. Pipeline: whole
layers, which the model's own forward pass must run one after another, each taking the hidden
state the one before returned.

Judged on a model built from config.json alone (no weight is read) by `launch.py start`, and on
the loaded model by every rank, so start refuses what the ranks would.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from ringserve.errors import ModelError

Sharding = Literal["all-to-sharded", "sharded-to-all"]
LINEARS = (nn.Linear, nn.QuantizedLinear)
SWITCH_LINEARS = (SwitchLinear, QuantizedSwitchLinear)
# Cache kinds whose bookkeeping a pipeline keeps for the layers a rank does not run.
FOLLOWED_CACHES = (
    mlx_cache.KVCache,
    mlx_cache.RotatingKVCache,
    mlx_cache.QuantizedKVCache,
    mlx_cache.ArraysCache,
    mlx_cache.CacheList,
)

# Projections of an attention block, unfused and fused (into one qkv matrix).
ATTENTION = (("q_proj", "k_proj", "v_proj", "o_proj"), ("qkv_proj", "o_proj"))
# An MLP's projections into its hidden width, and back out of it.
MLPS = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("gate_up_proj",), "down_proj"),
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
)


class SplitRefused(ModelError):
    """The model cannot be split this way; the message says why and what to do instead."""


@dataclass(frozen=True)
class Shard:
    """A linear (or switch) layer cut across ranks."""

    path: str
    sharding: Sharding
    segments: int | tuple[int, ...] = 1  # fused matrices are cut part by part
    # Cut in place, with no collective of its own: the enclosing experts block sums.
    in_place: bool = False


@dataclass
class TensorPlan:
    """What a tensor split of the model does, module by module (paths from the model's root)."""

    own_shard: bool = False  # mlx-lm's Model.shard does it all
    shards: list[Shard] = field(default_factory=list)
    divided: list[str] = field(default_factory=list)  # `path.attribute` head counts / ranks
    sliced: list[str] = field(default_factory=list)  # per-head parameters, cut along heads
    norms: list[str] = field(default_factory=list)  # norms over a whole cut projection
    summed: list[str] = field(default_factory=list)  # experts blocks summed across ranks
    unbiased: list[str] = field(default_factory=list)  # in-place cuts whose bias rank 0 adds


def decoder_layers(model: nn.Module) -> list[nn.Module] | None:
    layers = getattr(model, "layers", None)
    if isinstance(layers, list) and layers and all(isinstance(x, nn.Module) for x in layers):
        return layers
    return None


def module_paths(model: nn.Module) -> dict[int, str]:
    return {id(module): path for path, module in model.named_modules()}


def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    flat: list[tuple[str, Any]] = tree_flatten(  # type: ignore[assignment]
        module.children(), is_leaf=lambda x: isinstance(x, nn.Module)
    )
    for name, child in flat:
        if isinstance(child, nn.Module):
            yield name, child


def _own_arrays(module: nn.Module) -> list[str]:
    return [name for name, value in module.items() if hasattr(value, "shape")]


def _has_parameters(module: nn.Module) -> bool:
    return bool(tree_flatten(module.parameters()))


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _dims(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a linear layer, whether quantized or not."""
    if isinstance(module, nn.QuantizedLinear):
        out_dims, packed = module.weight.shape
        return int(out_dims), int(packed * 32 // module.bits)
    out_dims, in_dims = module.weight.shape[-2:]
    return int(out_dims), int(in_dims)


@dataclass
class _Planner:
    model_type: str
    ranks: int
    paths: dict[int, str]
    plan: TensorPlan = field(default_factory=TensorPlan)

    def refuse(self, why: str) -> SplitRefused:
        return SplitRefused(
            f"{self.model_type} cannot be split by heads over {self.ranks} ranks: {why}"
        )

    def path(self, module: nn.Module) -> str:
        return self.paths[id(module)]

    def check_cut(self, module: nn.Module, what: str, size: int) -> None:
        if size % self.ranks:
            raise self.refuse(f"{self.path(module)} has {what} {size}, which does not divide")
        group = getattr(module, "group_size", None)
        if group and (size // self.ranks) % group:
            raise self.refuse(
                f"{self.path(module)}'s {what} {size} cut {self.ranks} ways does not fill its "
                f"quantization groups of {group}"
            )

    def block(self, module: nn.Module, in_experts: bool = False) -> None:
        names = {name for name, _ in _children(module)}
        if not _has_parameters(module) or _is_norm(module):
            return
        if any(set(shape) <= names for shape in ATTENTION) and not in_experts:
            self.attention(module)
            return
        for into, out in MLPS:
            if set(into) | {out} <= names:
                self.mlp(module, into, out, in_experts)
                return
        if not in_experts and any(_is_switch_mlp(child) for _, child in _children(module)):
            self.experts(module)
            return
        if _own_arrays(module):
            raise self.refuse(
                f"{self.path(module)} ({type(module).__name__}) holds weights outside any "
                "attention, MLP or experts block"
            )
        for _, child in _children(module):
            if not _has_parameters(child) or _is_norm(child):
                continue
            if isinstance(child, LINEARS + SWITCH_LINEARS) or not any(_children(child)):
                raise self.refuse(
                    f"{self.path(child)} ({type(child).__name__}) is not part of an "
                    "attention, MLP or experts block"
                )
            self.block(child, in_experts)

    def attention(self, module: nn.Module) -> None:
        path = self.path(module)
        projections = [name for shape in ATTENTION for name in shape if name in module]
        for name in projections:
            if not isinstance(module[name], LINEARS):
                raise self.refuse(f"{path}.{name} is a {type(module[name]).__name__}")
        heads = {
            name: value
            for name, value in vars(module).items()
            if name.endswith("heads") and isinstance(value, int) and not isinstance(value, bool)
        }
        if not heads:
            raise self.refuse(f"{path} ({type(module).__name__}) names no head count")
        for name, value in heads.items():
            if value % self.ranks:
                raise self.refuse(f"{path}.{name} = {value} does not divide")
            self.plan.divided.append(f"{path}.{name}")
        q_heads = max(heads.values())
        kv_heads = min(heads.values())
        if "qkv_proj" in module:
            out_dims, _ = _dims(module.qkv_proj)
            head_dim = out_dims // (q_heads + 2 * kv_heads)
            q, kv = q_heads * head_dim, kv_heads * head_dim
            self.plan.shards.append(
                Shard(f"{path}.qkv_proj", "all-to-sharded", segments=(q, q + kv))
            )
            cut_widths = {q, kv}
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                self.plan.shards.append(Shard(f"{path}.{name}", "all-to-sharded"))
            cut_widths = {_dims(module.q_proj)[0], _dims(module.k_proj)[0]}
        self.check_cut(module.o_proj, "input width", _dims(module.o_proj)[1])
        self.plan.shards.append(Shard(f"{path}.o_proj", "sharded-to-all"))
        for name, child in _children(module):
            if name in projections or not _has_parameters(child):
                continue
            if not _is_norm(child):
                raise self.refuse(f"{path}.{name} ({type(child).__name__}) is not a projection")
            width = child.weight.shape[-1] if "weight" in child else 0
            if width in cut_widths:  # a norm over the whole projection, not per head
                self.plan.norms.append(f"{path}.{name}")
        for name in _own_arrays(module):
            if module[name].shape[0] != q_heads:
                raise self.refuse(f"{path}.{name} is neither a projection nor per head")
            self.plan.sliced.append(f"{path}.{name}")

    def mlp(self, module: nn.Module, into: tuple[str, ...], out: str, in_experts: bool) -> None:
        path = self.path(module)
        for name in (*into, out):
            layer = module[name]
            if not isinstance(layer, LINEARS + SWITCH_LINEARS):
                raise self.refuse(f"{path}.{name} is a {type(layer).__name__}")
            if name == out:
                self.check_cut(layer, "hidden width", _inputs(layer))
                self.plan.shards.append(Shard(f"{path}.{name}", "sharded-to-all", 1, in_experts))
                if in_experts and "bias" in layer:
                    self.plan.unbiased.append(f"{path}.{name}")
                continue
            segments = 2 if name == "gate_up_proj" else 1
            if _outputs(layer) % (segments * self.ranks):
                raise self.refuse(f"{path}.{name}'s width {_outputs(layer)} does not divide")
            self.plan.shards.append(Shard(f"{path}.{name}", "all-to-sharded", segments, in_experts))
        for name, child in _children(module):
            if name not in (*into, out) and _has_parameters(child):
                raise self.refuse(f"{path}.{name} ({type(child).__name__}) is not a projection")

    def experts(self, module: nn.Module) -> None:
        """The experts' hidden widths are cut in place; routers and gates stay whole on every
        rank; the block's output is summed across ranks (it is linear in the experts')."""
        self.plan.summed.append(self.path(module))
        for _, child in _children(module):
            if _is_switch_mlp(child) or any(
                set(into) | {out} <= {n for n, _ in _children(child)} for into, out in MLPS
            ):
                self.block(child, in_experts=True)
            elif isinstance(child, LINEARS) or _is_norm(child) or not _has_parameters(child):
                continue  # a router or a gate: computed whole by every rank
            else:
                raise self.refuse(
                    f"{self.path(child)} ({type(child).__name__}) is an unknown part of an "
                    "experts block"
                )


def _is_switch_mlp(module: nn.Module) -> bool:
    return any(isinstance(child, SWITCH_LINEARS) for _, child in _children(module))


def _inputs(layer: nn.Module) -> int:
    return int(layer.input_dims) if isinstance(layer, SWITCH_LINEARS) else _dims(layer)[1]


def _outputs(layer: nn.Module) -> int:
    return int(layer.output_dims) if isinstance(layer, SWITCH_LINEARS) else _dims(layer)[0]


def tensor_plan(model: nn.Module, config: dict[str, Any], ranks: int) -> TensorPlan:
    """How to cut every decoder layer across `ranks` ranks; SplitRefused says why not."""
    model_type = str(config.get("model_type"))
    planner = _Planner(model_type, ranks, module_paths(model))
    recurrent = sorted(
        {type(c).__name__ for c in _flat_caches(model) if isinstance(c, mlx_cache.ArraysCache)}
    )
    if recurrent:
        raise planner.refuse(
            f"its layers keep a recurrent state ({', '.join(recurrent)}), which is not split "
            "by heads"
        )
    if hasattr(model, "shard"):
        check_divisible(config, ranks)
        planner.plan.own_shard = True
        return planner.plan
    layers = decoder_layers(model)
    if layers is None:
        raise planner.refuse("it has no list of decoder layers (`model.layers`)")
    for layer in layers:
        planner.block(layer)
    return planner.plan


def _flat_caches(model: nn.Module) -> list[Any]:
    caches: list[Any] = []
    for cache in mlx_cache.make_prompt_cache(model):
        caches.extend(cache.caches if isinstance(cache, mlx_cache.CacheList) else [cache])
    return caches


def check_divisible(config: dict[str, Any], ranks: int) -> None:
    """Where mlx-lm's own Model.shard cuts the model: its heads and widths must divide, and
    the cut widths fill whole quantization groups."""
    text_config = config.get("text_config", config)
    quantization = config.get("quantization") or {}
    group = quantization.get("group_size") if isinstance(quantization, dict) else None
    heads = text_config.get("num_attention_heads")
    head_dim = text_config.get("head_dim") or (
        text_config.get("hidden_size", 0) // heads if isinstance(heads, int) and heads else 0
    )
    widths = {
        "num_attention_heads": heads,
        "num_key_value_heads": text_config.get("num_key_value_heads"),
        "intermediate_size": text_config.get("intermediate_size"),
        "moe_intermediate_size": text_config.get("moe_intermediate_size"),
    }
    prefix = f"{config.get('model_type')} cannot be split by heads over {ranks} ranks"
    for key, value in widths.items():
        if isinstance(value, int) and value % ranks:
            raise SplitRefused(f"{prefix}: its {key}={value} does not divide")
    if not group:
        return
    inputs = {
        "attention output": heads * head_dim if isinstance(heads, int) else None,
        "intermediate_size": widths["intermediate_size"],
        "moe_intermediate_size": widths["moe_intermediate_size"],
    }
    for key, value in inputs.items():
        if isinstance(value, int) and value and (value // ranks) % group:
            raise SplitRefused(
                f"{prefix}: its {key} {value} cut {ranks} ways does not fill its quantization "
                f"groups of {group}"
            )


def pipeline_problem(model: nn.Module, model_type: str, ranks: int) -> str | None:
    """Why a pipeline of whole layers cannot serve the model, or None when it can."""
    prefix = f"{model_type} cannot be split into a pipeline"
    layers = decoder_layers(model)
    if layers is None:
        return f"{prefix}: it has no list of decoder layers (`model.layers`)"
    if len(layers) < ranks:
        return f"{prefix} of {ranks} ranks: it has {len(layers)} layers"
    holder = layers_holder(model, layers)
    if holder is None or not runs_layers_in_a_chain(type(holder)):
        return (
            f"{prefix}: its forward pass does not run `layers` one after another, each on the "
            "hidden state the one before returned"
        )
    for cache in _flat_caches(model):
        if not isinstance(cache, FOLLOWED_CACHES):
            return f"{prefix}: its layers keep a {type(cache).__name__}, which it cannot follow"
    return None


def layers_holder(model: nn.Module, layers: list[nn.Module]) -> nn.Module | None:
    """The module whose forward pass runs `layers`: the one holding them as its own `layers`
    (`model.layers` may be a copy of that list, as with mlx-lm's pipeline models)."""
    for _, module in model.named_modules():
        held = module.get("layers")
        same = isinstance(held, list) and len(held) == len(layers)
        if same and all(a is b for a, b in zip(held, layers, strict=True)):
            return module
    return None


def runs_layers_in_a_chain(holder: type) -> bool:
    """Whether the class's forward pass calls its layers only in a loop over `self.layers` (or
    mlx-lm's `self.pipeline_layers`), each call's result replacing the hidden state it was
    given: then a rank may skip the layers it does not run and receive that state instead."""
    try:
        source = textwrap.dedent(inspect.getsource(holder.__call__))
    except (OSError, TypeError):
        return False
    chained = False
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.For) or "layers" not in ast.unparse(node.iter):
            continue
        names = {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        for statement in ast.walk(node):
            if not isinstance(statement, ast.Call) or not isinstance(statement.func, ast.Name):
                continue
            if statement.func.id not in names:
                continue
            chained = _assigned_back(node, statement)
            if not chained:
                return False
    return chained


def _assigned_back(loop: ast.For, call: ast.Call) -> bool:
    """`x = layer(x, ...)`: the call's first argument is the name its result is assigned to."""
    if not call.args or not isinstance(call.args[0], ast.Name):
        return False
    for statement in ast.walk(loop):
        if isinstance(statement, ast.Assign) and statement.value is call:
            targets = statement.targets
            return (
                len(targets) == 1
                and isinstance(targets[0], ast.Name)
                and targets[0].id == call.args[0].id
            )
    return False


def model_skeleton(model_dir: Path, config: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    """The model's modules as mlx-lm builds them from `config`, quantized as it says, with no
    weight read (their initial values are lazy and never computed)."""
    from mlx_lm.utils import _get_classes

    model_file = config.get("model_file")
    if model_file and trust_remote_code:
        spec = importlib.util.spec_from_file_location(
            "ringserve_model_file", model_dir / model_file
        )
        if spec is None or spec.loader is None:
            raise ModelError(f"cannot import {model_dir / model_file}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model_class, args_class = module.Model, module.ModelArgs
    else:
        model_class, args_class = _get_classes(config)
    model: nn.Module = model_class(args_class.from_dict(config))
    quantization = config.get("quantization")
    if isinstance(quantization, dict):
        _quantize_as_configured(model, quantization)
    return model


def _quantize_as_configured(model: nn.Module, quantization: dict[str, Any]) -> None:
    def per_layer(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized"):
            return False
        weight = getattr(module, "weight", None)
        return weight is not None and weight.shape[-1] % quantization["group_size"] == 0

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=per_layer,
    )


@dataclass(frozen=True)
class SplitChoices:
    """Which layouts can split the model over a number of ranks, and why the others cannot."""

    tensor: TensorPlan | None
    tensor_problem: str | None
    pipeline_problem: str | None


def split_choices(model: nn.Module, config: dict[str, Any], ranks: int) -> SplitChoices:
    try:
        plan: TensorPlan | None = tensor_plan(model, config, ranks)
        tensor_problem = None
    except SplitRefused as exc:
        plan, tensor_problem = None, str(exc)
    model_type = str(config.get("model_type"))
    return SplitChoices(plan, tensor_problem, pipeline_problem(model, model_type, ranks))


def layout_refusal(choices: SplitChoices, parallel: str) -> str | None:
    """Why RINGSERVE_PARALLEL cannot be served, pointing only at a layout that works."""
    tensor, pipeline = choices.tensor_problem, choices.pipeline_problem
    if tensor is not None and pipeline is not None:
        return f"{tensor}; {pipeline}; it can be served on one rank only"
    if parallel == "tensor" and tensor is not None:
        return f"{tensor}; use RINGSERVE_PARALLEL=pipeline (or auto)"
    if parallel == "pipeline" and pipeline is not None:
        return f"{pipeline}; use RINGSERVE_PARALLEL=tensor (or auto)"
    return None


def check_splittable(
    model_dir: Path, config: dict[str, Any], ranks: int, parallel: str, trust_remote_code: bool
) -> None:
    """Raise SplitRefused when RINGSERVE_PARALLEL cannot split this model over `ranks`."""
    if ranks <= 1:
        return
    model = model_skeleton(model_dir, config, trust_remote_code)
    refusal = layout_refusal(split_choices(model, config, ranks), parallel)
    if refusal is not None:
        raise SplitRefused(refusal)


def tensor_splits(
    model_dir: Path, config: dict[str, Any], ranks: int, trust_remote_code: bool
) -> bool:
    """Whether a tensor split of the model over `ranks` works."""
    model = model_skeleton(model_dir, config, trust_remote_code)
    return split_choices(model, config, ranks).tensor is not None
