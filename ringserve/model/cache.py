"""What this host's Hugging Face cache holds (huggingface_hub's scan), for `launch.py models`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from ringserve.model.source import quantization


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    commit: str
    refs: frozenset[str]
    size: int
    model_type: str | None
    quantization: str | None


def _config(snapshot: Path) -> dict:
    try:
        found = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def cached_models(cache_dir: Path | None = None) -> tuple[list[CachedModel], Path]:
    """Every model revision in the cache (HF_HUB_CACHE unless given), by repo id."""
    where = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        info = scan_cache_dir(where)
    except CacheNotFound:
        return [], where
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            config = _config(revision.snapshot_path)
            model_type = config.get("model_type")
            found.append(
                CachedModel(
                    repo_id=repo.repo_id,
                    commit=revision.commit_hash,
                    refs=frozenset(revision.refs),
                    size=revision.size_on_disk,
                    model_type=model_type if isinstance(model_type, str) else None,
                    quantization=quantization(config),
                )
            )
    return found, where
