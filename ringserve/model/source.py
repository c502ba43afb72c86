"""What the configured model is (a local directory or a hub repo id) and whether a directory
holds a model mlx-lm can serve on this many ranks, judged from its files alone (no weight read)."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringserve.errors import ModelError

# A directory mlx-lm can load from: what each part is called in messages, and its files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model")
LAYOUT = "config.json, a tokenizer and *.safetensors weights"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelFacts:
    """A model directory as `models` and the checks see it."""

    path: Path
    model_type: str
    quantization: str | None
    weight_bytes: int
    context_length: int | None


def looks_like_hub_id(model: str) -> bool:
    """`org/name` that is not a path on this machine; anything else is meant as a directory."""
    if model.startswith(("/", ".", "~")) or Path(model).expanduser().exists():
        return False
    return bool(HUB_ID.match(model))


def where(name: str, host: str) -> str:
    """How every model message begins: the model as the user wrote it, and the host."""
    return f"model {name} on {host}"


def read_config(path: Path, name: str, host: str, fix: str) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{where(name, host)}: {path} has no config.json; {fix}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where(name, host)}: {config_file} is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{where(name, host)}: {config_file} is not a JSON object")
    return config


def mlx_lm_module(model_type: str) -> str:
    """The mlx-lm module that implements `model_type` (mlx-lm renames a few)."""
    from mlx_lm.utils import MODEL_REMAPPING

    return MODEL_REMAPPING.get(model_type, model_type)


def check_architecture(
    config: dict[str, Any], name: str, host: str, trust_remote_code: bool
) -> str:
    """The model's type, if mlx-lm implements it (or the model brings its own code, trusted)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{where(name, host)}: its config.json names no model_type")
    if trust_remote_code and config.get("model_file"):
        return model_type
    module = mlx_lm_module(model_type)
    known = re.fullmatch(r"\w+", module) and importlib.util.find_spec(f"mlx_lm.models.{module}")
    if not known:
        import mlx_lm

        raise ModelError(
            f"{where(name, host)}: model_type {model_type!r} is not supported by mlx-lm "
            f"{mlx_lm.__version__}; choose a model of an architecture mlx-lm implements "
            "(mlx_lm/models/), or upgrade mlx-lm on every host"
        )
    return model_type


def quantization(config: dict[str, Any]) -> str | None:
    """How the weights are quantized, as `4-bit` (group 64), or None for full precision."""
    found = config.get("quantization") or config.get("quantization_config")
    if not isinstance(found, dict):
        return None
    bits, group = found.get("bits"), found.get("group_size")
    if bits is None:
        return str(found.get("quant_method") or found.get("mode") or "quantized")
    return f"{bits}-bit" + (f" (group {group})" if group else "")


def has_tokenizer(files: set[str]) -> bool:
    return (
        any(name in files for name in TOKENIZER_FILES)
        or any(name.endswith(".tiktoken") for name in files)
        or {"vocab.json", "merges.txt"} <= files
    )


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def missing_indexed_weights(path: Path) -> list[str]:
    """The files the safetensors index names that are not in `path`."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError):
        return []
    return sorted({f for f in weight_map.values() if not (path / f).is_file()})


def check_model_dir(
    path: Path,
    name: str,
    host: str,
    ranks: int,
    trust_remote_code: bool = False,
    need_weights: bool = True,
    parallel: str = "tensor",
) -> ModelFacts:
    """Raise one ModelError line when `path` is not a model mlx-lm can serve on `ranks` ranks
    split as `parallel` (RINGSERVE_PARALLEL) says."""
    fix = f"point RINGSERVE_MODEL at a directory with {LAYOUT}, or at a hub repo id"
    if not path.is_dir():
        raise ModelError(f"{where(name, host)}: {path} is not a directory; {fix}")
    config = read_config(path, name, host, fix)
    model_type = check_architecture(config, name, host, trust_remote_code)
    from ringserve.model.splits import check_splittable  # MLX, only once there is a model

    try:
        check_splittable(path, config, ranks, parallel, trust_remote_code)
    except ModelError as exc:
        raise type(exc)(f"{where(name, host)}: {exc}") from exc
    files = {p.name for p in path.iterdir()}
    if not has_tokenizer(files):
        raise ModelError(
            f"{where(name, host)}: {path} has no tokenizer (tokenizer.json or tokenizer.model); "
            f"{fix}"
        )
    weights = weight_files(path)
    missing = missing_indexed_weights(path)
    if need_weights and (not weights or missing):
        what = f"misses {', '.join(missing[:3])}" if missing else "has no *.safetensors weights"
        raise ModelError(f"{where(name, host)}: {path} {what}; {fix}")
    text_config = config.get("text_config", config)
    context = text_config.get("max_position_embeddings") or config.get("max_position_embeddings")
    return ModelFacts(
        path=path,
        model_type=model_type,
        quantization=quantization(config),
        weight_bytes=sum(f.stat().st_size for f in weights),
        context_length=context if isinstance(context, int) else None,
    )
