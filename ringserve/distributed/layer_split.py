"""How many of the model's layers each rank runs in a pipeline, in proportion to its memory.

Pure functions of the checkpoint's sizes and the ranks' budgets: every rank computes the same
split from the same numbers. The order is mlx-lm's (`PipelineMixin.pipeline`): rank 0 runs the
last layers, the highest rank the first; `split[r]` is rank r's count.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ringserve.errors import ConfigError, MemoryCheckError
from ringserve.telemetry.memory import DEFAULT_MARGIN, human_bytes

# mlx-lm's own match for a layer's weights (`sharded_load`): sanitize may rename the rest.
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class ModelSizes:
    """A checkpoint's weight bytes: per layer, and the rest (embedding, final norm, head),
    which every pipeline stage holds (mlx-lm's pipeline runs them on every rank)."""

    layer_bytes: tuple[int, ...]
    shared_bytes: int

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.shared_bytes


@dataclass(frozen=True)
class FileSizes:
    """One safetensors file's part of the checkpoint: weight bytes per layer (below the
    model's layer count) and of the rest, and its tensors' elements (parameters)."""

    layer_bytes: tuple[int, ...]
    shared_bytes: int
    elements: int


def read_header(handle: BinaryIO) -> dict[str, Any]:
    """A safetensors file's header: each tensor's dtype, shape and byte range (no weights)."""
    header_len = int.from_bytes(handle.read(8), "little")
    header: dict[str, Any] = json.loads(handle.read(header_len))
    return header


def file_sizes(header: dict[str, Any], num_layers: int) -> FileSizes:
    """Tensors of layers past `num_layers` (multi-token-prediction layers, which mlx-lm drops)
    count nowhere."""
    layers = [0] * num_layers
    shared = elements = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        size = int(end) - int(start)
        elements += math.prod(int(dim) for dim in entry["shape"])
        match = LAYER_NAME.search(name)
        if match is None:
            shared += size
        elif int(match.group(1)) < num_layers:
            layers[int(match.group(1))] += size
    return FileSizes(tuple(layers), shared, elements)


def combined(files: Sequence[FileSizes], num_layers: int) -> ModelSizes:
    layers = [sum(f.layer_bytes[i] for f in files) for i in range(num_layers)]
    return ModelSizes(tuple(layers), sum(f.shared_bytes for f in files))


def model_sizes(model_path: Path, num_layers: int) -> ModelSizes:
    """Read the sizes from the safetensors headers of the files in `model_path`."""
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise MemoryCheckError(f"no safetensors weights found in {model_path}")
    read = []
    for file in files:
        with file.open("rb") as handle:
            read.append(file_sizes(read_header(handle), num_layers))
    return combined(read, num_layers)


def layer_ranges(split: Sequence[int]) -> list[range]:
    """The layers rank r runs, for every r (rank 0 the last ones)."""
    return [range(sum(split[r + 1 :]), sum(split[r:])) for r in range(len(split))]


def stage_bytes(sizes: ModelSizes, split: Sequence[int]) -> list[int]:
    """The weight bytes each rank holds under `split`."""
    return [
        sizes.shared_bytes + sum(sizes.layer_bytes[i] for i in layers)
        for layers in layer_ranges(split)
    ]


def _need(n_bytes: int, margin: float) -> int:
    return math.ceil(n_bytes * (1 + margin))


def _proportional(sizes: ModelSizes, budgets: Sequence[int]) -> list[int]:
    """Each rank's bytes (its layers and the shared weights) as near to the same fraction of
    its budget as whole layers allow, at least one layer each."""
    ranks, n_layers = len(budgets), len(sizes.layer_bytes)
    fraction = (sum(sizes.layer_bytes) + ranks * sizes.shared_bytes) / sum(budgets)
    cumulative = [0]
    for size in sizes.layer_bytes:
        cumulative.append(cumulative[-1] + size)
    split = [0] * ranks
    start, target = 0, 0.0
    # Layer order: the highest rank runs the first layers.
    for position, rank in enumerate(reversed(range(ranks))):
        left_after = ranks - position - 1
        if left_after == 0:
            split[rank] = n_layers - start
            break
        target += max(fraction * budgets[rank] - sizes.shared_bytes, 0.0)
        lowest, highest = start + 1, n_layers - left_after
        end = min(range(lowest, highest + 1), key=lambda i: (abs(cumulative[i] - target), i))
        split[rank] = end - start
        start = end
    return split


def _balanced(sizes: ModelSizes, budgets: Sequence[int], margin: float) -> list[int] | None:
    """The split whose fullest rank (need over budget) is least full; None if none fits.
    For when rounding the proportional split to whole layers overfills a rank."""

    def fill(limit: float) -> list[int] | None:
        ranks, n_layers = len(budgets), len(sizes.layer_bytes)
        split = [0] * ranks
        start = 0
        for position, rank in enumerate(reversed(range(ranks))):
            left_after = ranks - position - 1
            end, held = start, sizes.shared_bytes
            room = limit * budgets[rank]
            while end < n_layers - left_after and (
                end == start or _need(held + sizes.layer_bytes[end], margin) <= room
            ):
                held += sizes.layer_bytes[end]
                end += 1
            if _need(held, margin) > room:
                return None
            split[rank] = end - start
            start = end
        return split if start == n_layers else None

    if fill(1.0) is None:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if fill(middle) is None:
            low = middle
        else:
            high = middle
    return fill(high)


def pipeline_split(
    sizes: ModelSizes,
    budgets: Sequence[int],
    margin: float = DEFAULT_MARGIN,
    model_name: str = "the model",
) -> list[int]:
    """Layers per rank (rank 0 first), each rank's weights in proportion to `budgets[r]`
    (bytes it may hold), with `margin` headroom; MemoryCheckError naming the ranks that
    cannot hold their share when the budgets are too small."""
    ranks, n_layers = len(budgets), len(sizes.layer_bytes)
    if ranks < 1:
        raise ValueError("a pipeline needs at least one rank")
    if n_layers < ranks:
        raise MemoryCheckError(
            f"{model_name} has {n_layers} layers, too few for {ranks} pipeline ranks "
            "(each runs at least one); use fewer ranks"
        )
    split = _proportional(sizes, budgets)
    if _fits(sizes, split, budgets, margin):
        return split
    balanced = _balanced(sizes, budgets, margin)
    if balanced is not None:
        return balanced
    raise _shortage(sizes, split, budgets, margin, model_name)


def check_split(
    sizes: ModelSizes,
    split: Sequence[int],
    budgets: Sequence[int],
    margin: float = DEFAULT_MARGIN,
    model_name: str = "the model",
) -> None:
    """A split decided beforehand (RINGSERVE_PIPELINE_SPLIT, which `start` sets to the split
    it copied the model's files for): it must cover the layers and fit every rank's budget."""
    n_layers = len(sizes.layer_bytes)
    if len(split) != len(budgets) or min(split, default=0) < 1 or sum(split) != n_layers:
        raise ConfigError(
            f"RINGSERVE_PIPELINE_SPLIT={','.join(map(str, split))} does not give each of the "
            f"{len(budgets)} ranks at least one of the {n_layers} layers of {model_name}, rank 0 "
            "first; fix it, or leave it empty for a split by the ranks' memory"
        )
    if not _fits(sizes, split, budgets, margin):
        raise _shortage(sizes, split, budgets, margin, model_name)


def _fits(sizes: ModelSizes, split: Sequence[int], budgets: Sequence[int], margin: float) -> bool:
    held = stage_bytes(sizes, split)
    return all(_need(h, margin) <= b for h, b in zip(held, budgets, strict=True))


def _shortage(
    sizes: ModelSizes,
    split: Sequence[int],
    budgets: Sequence[int],
    margin: float,
    model_name: str,
) -> MemoryCheckError:
    """One line naming every rank that cannot hold its share of `split`, and the totals."""
    ranks, n_layers = len(budgets), len(sizes.layer_bytes)
    held = stage_bytes(sizes, split)
    short = [
        f"rank {rank} has {human_bytes(budget)} but needs {human_bytes(_need(h, margin))} "
        f"for {count} layer{'s' if count != 1 else ''}"
        for rank, (budget, h, count) in enumerate(zip(budgets, held, split, strict=True))
        if _need(h, margin) > budget
    ]
    together = _need(sum(sizes.layer_bytes) + ranks * sizes.shared_bytes, margin)
    return MemoryCheckError(
        f"the ranks' memory cannot hold {model_name} split by layers: {'; '.join(short)} "
        f"(its {n_layers} layers take {human_bytes(sum(sizes.layer_bytes))}, and every rank "
        f"holds the embedding and head, {human_bytes(sizes.shared_bytes)}; with "
        f"{margin:.0%} headroom the {ranks} ranks need {human_bytes(together)} together and "
        f"have {human_bytes(sum(budgets))}); free memory, raise memory_budget, add hosts, or "
        "choose a smaller model"
    )
