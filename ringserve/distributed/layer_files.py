"""Which of a checkpoint's safetensors files hold which layers, read from its index (no weight
is read): the files a pipeline rank needs on its host, which `start` copies there and each rank
checks it has before loading.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ringserve.distributed.layer_split import LAYER_NAME

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class FileLayers:
    """What one weight file holds: tensors of these layers (below the model's layer count), and
    whether it holds any of no layer (embedding, final norm, head: every rank needs those)."""

    layers: frozenset[int]
    shared: bool


def read_weight_map(model_dir: Path) -> dict[str, str] | None:
    """The index's tensor -> file map, or None for a checkpoint without one."""
    index = model_dir / INDEX
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text()).get("weight_map")
    return dict(weight_map) if isinstance(weight_map, dict) else None


def weight_file_names(model_dir: Path, weight_map: Mapping[str, str] | None) -> list[str]:
    """The checkpoint's weight files: those its index names, else those in the directory."""
    if weight_map:
        return sorted(set(weight_map.values()))
    return sorted(path.name for path in model_dir.glob("*.safetensors"))


def file_layers(
    files: Iterable[str], weight_map: Mapping[str, str] | None, num_layers: int
) -> dict[str, FileLayers]:
    """Each file's layers. Tensors of layers past `num_layers` (multi-token prediction, which
    mlx-lm drops) count nowhere; a file the index does not describe counts as shared."""
    held: dict[str, set[int]] = {name: set() for name in files}
    shared = {name: name not in set((weight_map or {}).values()) for name in held}
    for tensor, name in (weight_map or {}).items():
        if name not in held:
            continue
        match = LAYER_NAME.search(tensor)
        if match is None:
            shared[name] = True
        elif int(match.group(1)) < num_layers:
            held[name].add(int(match.group(1)))
    return {name: FileLayers(frozenset(held[name]), shared[name]) for name in held}


def files_for(layers_of: Mapping[str, FileLayers], layers: range | None) -> set[str]:
    """The files a rank running `layers` needs; None: every file (a tensor split, one rank)."""
    if layers is None:
        return set(layers_of)
    wanted = set(layers)
    return {name for name, held in layers_of.items() if held.shared or held.layers & wanted}
