"""mlx-lm prompt-cache files, written by a thread that does not call MLX.

A file holds what `mlx_lm.models.cache.save_prompt_cache` writes (the caches' state arrays by
their tree path, the scalars among them as small arrays, and `[metadata, classes, scalars]` as
the header's metadata), so `load_prompt_cache` reads it back. `save_prompt_cache` itself cannot
run beside the engine: MLX's `save_safetensors` makes each array contiguous and evaluates it,
and MLX's evaluation must not run on two threads at once. So the thread that runs the model
prepares a file's parts (evaluated arrays, viewed in place) and any thread writes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

# Safetensors' names for MLX's dtypes.
DTYPE_NAMES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.uint16: "U16",
    mx.uint32: "U32",
    mx.uint64: "U64",
    mx.int8: "I8",
    mx.int16: "I16",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
}
ALIGN = 8  # safetensors pads its header so the data starts 8-byte aligned


@dataclass(frozen=True)
class FileParts:
    """A file's bytes: the header, then views of the arrays' memory (which they keep alive)."""

    header: bytes
    buffers: tuple[memoryview, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(b.nbytes for b in self.buffers)


def _as_array(name: str, value: Any, scalars: list[Any]) -> mx.array:
    """A state value as save_prompt_cache stores it (noting the scalars it turns to arrays)."""
    if isinstance(value, mx.array):
        return value
    if isinstance(value, bool | int | float):
        scalars.append((name, "scalar"))
        return mx.array(value)
    if isinstance(value, str):
        scalars.append((name, "string"))
        return mx.array([ord(char) for char in value])
    if value is None:
        scalars.append((name, "none"))
        return mx.array([])
    raise ValueError(f"a cache state holds {type(value).__name__}, which no file can hold")


def file_parts(cache: list[Any], metadata: Mapping[str, str]) -> FileParts:
    """The file of `cache` with `metadata`, ready to write. Calls MLX: on the model's thread."""
    scalars: list[Any] = [""]
    states = cast(list[tuple[str, Any]], tree_flatten([layer.state for layer in cache]))
    arrays = {name: mx.contiguous(_as_array(name, value, scalars)) for name, value in states}
    mx.eval(list(arrays.values()))
    classes = [type(layer).__name__ for layer in cache]
    header: dict[str, Any] = {
        "__metadata__": dict(tree_flatten([dict(metadata), classes, scalars]))
    }
    buffers = []
    offset = 0
    for name, array in arrays.items():
        view = memoryview(array)  # type: ignore[arg-type]
        header[name] = {
            "dtype": DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        offset += view.nbytes
        buffers.append(view)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGN)
    return FileParts(len(text).to_bytes(8, "little") + text, tuple(buffers))


def write_parts(path: Path, parts: FileParts) -> None:
    """Write a file's parts at `path` (no MLX call: any thread may)."""
    with path.open("wb") as handle:
        handle.write(parts.header)
        for buffer in parts.buffers:
            handle.write(buffer)
