"""A Hugging Face hub cache laid out as huggingface_hub writes it, built from a local model
directory, so a hub repo id resolves offline: models--org--name/{blobs,refs,snapshots}, each blob
named by the hub's hash of it (sha256 for LFS files, the git blob id of the others). And a model
re-saved in several safetensors files, so that a pipeline host needs only some of them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

LAYER = re.compile(r"layers\.(\d+)\.")


def hub_etag(name: str, data: bytes) -> str:
    """The hub's ETag of a file: LFS files (weights) by sha256, the others by git blob id."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(
    model_dir: Path,
    cache: Path,
    repo_id: str,
    ref: str = "main",
    keep: Callable[[str], bool] = lambda name: True,
) -> Path:
    """Put the files of `model_dir` that `keep` accepts into `cache` as revision `ref` of
    `repo_id`; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and keep(p.name))
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = repo / "blobs" / hub_etag(path.name, path.read_bytes())
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def sharded_copy(model_dir: Path, out_dir: Path, max_bytes: int) -> Path:
    """`model_dir` with its weights re-saved in files of about `max_bytes` each, in the order
    the layers run (embedding first, final norm and head last), with the index mlx-lm writes:
    a layer's tensors may straddle two files."""
    if (out_dir / "model.safetensors.index.json").is_file():
        return out_dir
    weights: dict[str, mx.array] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        loaded = mx.load(str(path))
        assert isinstance(loaded, dict)
        weights.update(loaded)

    def place(name: str) -> tuple[int, str]:
        layer = LAYER.search(name)
        if layer is not None:
            return int(layer.group(1)) + 1, name
        return (0 if "embed" in name else 10**6), name

    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights, key=place):
        if shards[-1] and size + weights[name].nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += weights[name].nbytes
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copyfile(path, staging / path.name)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(staging / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    staging.rename(out_dir)
    return out_dir
