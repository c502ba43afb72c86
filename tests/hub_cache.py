"""A Hugging Face hub cache laid out as huggingface_hub writes it, built from a local model
directory, so a hub repo id resolves offline: models--org--name/{blobs,refs,snapshots}."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


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
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
