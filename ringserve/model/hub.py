"""A hub model on this host, through huggingface_hub: what fetching it means (the file list
and sizes, before any weight arrives), the download with its byte count, the cached copy a rank
loads offline, and every failure as one ModelUnavailableError line.

huggingface_hub reads HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE itself.
"""

from __future__ import annotations

import io
import logging
import shutil
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    DryRunError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.std import tqdm

from ringserve.errors import MemoryCheckError, ModelUnavailableError
from ringserve.model.source import where
from ringserve.telemetry.memory import human_bytes

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # bytes done, bytes in all


def fetch_patterns() -> list[str]:
    """The files mlx-lm downloads for a model (its own list)."""
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return list(DEFAULT_ALLOW_PATTERNS)


def metadata_patterns() -> list[str]:
    """Everything mlx-lm downloads but the weights: small files, fetched first."""
    return [p for p in fetch_patterns() if not p.endswith(".safetensors")]


def offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _revision_words(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def unavailable(exc: BaseException, name: str, revision: str | None, host: str) -> str:
    """The one line a huggingface_hub failure becomes: what happened and the way out."""
    at = where(name, host)
    cause = exc.__cause__ if isinstance(exc, DryRunError) and exc.__cause__ else exc
    if isinstance(cause, RevisionNotFoundError):
        return (
            f"{at}: revision {revision!r} does not exist in the repo; set RINGSERVE_MODEL_REVISION "
            "to a branch, tag or commit of it (or leave it empty for main)"
        )
    if isinstance(cause, GatedRepoError):
        return (
            f"{at}: the repo is gated; accept its terms on the hub, then set HF_TOKEN (or run "
            "`hf auth login`) on this host"
        )
    if isinstance(cause, RepositoryNotFoundError) or (
        isinstance(cause, HfHubHTTPError) and cause.response.status_code == 401
    ):
        return (
            f"{at}: no such repo on the hub, or it is private and needs a token; check the id in "
            "RINGSERVE_MODEL, or set HF_TOKEN (or run `hf auth login`) on this host"
        )
    if isinstance(cause, HFValidationError):
        return f"{at}: not a valid hub repo id ({cause}); fix RINGSERVE_MODEL"
    if offline():
        return (
            f"{at}: not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
            f"{_revision_words(revision)} and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to "
            "download it, copy the cache there, or set RINGSERVE_MODEL to a local model directory"
        )
    reason = f"{type(cause).__name__}: {cause}".splitlines()[0]
    return (
        f"{at}: cannot reach the hub at {constants.ENDPOINT} ({reason}) and it is not in the cache "
        f"({constants.HF_HUB_CACHE}); check the network or proxy, or set HF_HUB_OFFLINE=1 with a "
        "filled cache, or set RINGSERVE_MODEL to a local model directory"
    )


class NotCached(ModelUnavailableError):
    """The cache does not hold the model, and the hub was not asked (offline) or not reached:
    another host may still hold it and copy it here."""


def find_snapshot(name: str, revision: str | None) -> Path | None:
    """The snapshot directory huggingface_hub's own lookup finds in this host's cache (never
    contacting the hub), complete or not; None when there is none."""
    try:
        return Path(
            snapshot_download(
                name, revision=revision, local_files_only=True, allow_patterns=fetch_patterns()
            )
        )
    except IncompleteSnapshotError as exc:  # a pipeline host holds only its layers' files
        return Path(exc.snapshot_path)
    except LocalEntryNotFoundError:
        return None


def cached_snapshot(name: str, revision: str | None, host: str) -> Path:
    """The snapshot directory in this host's cache (never contacts the hub). On a pipeline host
    it may hold only the weight files of its ranks' layers (each rank checks its own)."""
    try:
        found = find_snapshot(name, revision)
    except HFValidationError as exc:
        raise ModelUnavailableError(unavailable(exc, name, revision, host)) from exc
    if found is None:
        raise ModelUnavailableError(
            f"{where(name, host)}: not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
            f"{_revision_words(revision)}; run `launch.py start`, which fetches it on every host "
            "first"
        )
    return found


@dataclass(frozen=True)
class HubPlan:
    """What fetching the model on this host means, known before any weight is downloaded."""

    path: Path  # the snapshot directory, with every file but the weights already there
    commit: str | None
    weight_bytes: int
    missing_bytes: int
    missing_files: int
    reached_hub: bool  # False: resolved from the cache alone (offline, or the hub unreachable)


def plan_fetch(
    name: str, revision: str | None, host: str, weights: Collection[str] | None = None
) -> HubPlan:
    """Resolve the repo and revision, fetch its small files and size what is left to download
    (of `weights` only, when given: a pipeline host's share).

    Offline (HF_HUB_OFFLINE), or with the hub unreachable, the cache must hold the model
    (NotCached otherwise)."""
    patterns = fetch_patterns()
    if offline():
        try:
            path = Path(
                snapshot_download(
                    name, revision=revision, local_files_only=True, allow_patterns=patterns
                )
            )
        except HFValidationError as exc:
            raise ModelUnavailableError(unavailable(exc, name, revision, host)) from exc
        except LocalEntryNotFoundError as exc:
            raise NotCached(unavailable(exc, name, revision, host)) from exc
        held = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return HubPlan(path, path.name, held, 0, 0, reached_hub=False)
    try:
        listed = snapshot_download(
            name, revision=revision, allow_patterns=patterns, dry_run=True, tqdm_class=silent()
        )
    except (DryRunError, HfHubHTTPError, HFValidationError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, DryRunError) else exc
        if isinstance(cause, (HfHubHTTPError, HFValidationError)):
            raise ModelUnavailableError(unavailable(exc, name, revision, host)) from exc
        try:  # the hub cannot be reached: a complete cached copy still serves
            path = Path(
                snapshot_download(
                    name, revision=revision, local_files_only=True, allow_patterns=patterns
                )
            )
        except LocalEntryNotFoundError:
            raise NotCached(unavailable(exc, name, revision, host)) from exc
        log.warning("%s: the hub is unreachable (%s); using the cached copy", name, cause)
        held = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return HubPlan(path, path.name, held, 0, 0, reached_hub=False)
    commit = listed[0].commit_hash if listed else None
    try:
        path = Path(
            snapshot_download(
                name,
                revision=commit or revision,
                allow_patterns=metadata_patterns(),
                tqdm_class=silent(),
            )
        )
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(unavailable(exc, name, revision, host)) from exc
    weight_files = [
        f
        for f in listed
        if f.filename.endswith(".safetensors") and (weights is None or f.filename in weights)
    ]
    # The small files arrived just above; what is left is weights.
    missing = [f for f in weight_files if f.will_download]
    return HubPlan(
        path=path,
        commit=commit,
        weight_bytes=sum(f.file_size or 0 for f in weight_files),
        missing_bytes=sum(f.file_size or 0 for f in missing),
        missing_files=len(missing),
        reached_hub=True,
    )


def check_disk(plan: HubPlan, name: str, host: str) -> None:
    """Refuse a download the cache's disk cannot hold."""
    if not plan.missing_bytes:
        return
    cache = Path(constants.HF_HUB_CACHE)
    probe = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if plan.missing_bytes > free:
        raise MemoryCheckError(
            f"{where(name, host)}: the download needs {human_bytes(plan.missing_bytes)} but "
            f"{probe} has {human_bytes(free)} free; free disk space there, or point HF_HOME "
            "(or HF_HUB_CACHE) at a larger disk"
        )


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def byte_counter(on_progress: Progress) -> type[tqdm]:
    """A tqdm class for snapshot_download that draws nothing and reports its bytes: the
    largest count and total among its byte bars (bytes written; with Xet, bytes received too)."""
    lock = threading.Lock()
    bars: list[tqdm] = []

    class Counter(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = _Discard()
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)
            if self.unit == "B":
                with lock:
                    bars.append(self)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.unit == "B":
                with lock:
                    done = max(int(bar.n) for bar in bars)
                    total = max(int(bar.total or 0) for bar in bars)
                    on_progress(done, total)
            return shown

    return Counter


def silent() -> type[tqdm]:
    return byte_counter(lambda done, total: None)


def download(
    name: str,
    plan: HubPlan,
    revision: str | None,
    host: str,
    on_progress: Progress,
    weights: Collection[str] | None = None,
) -> Path:
    """Fetch what the plan found missing (weights included; of `weights` only, when given)
    into the cache."""
    patterns = fetch_patterns() if weights is None else [*metadata_patterns(), *sorted(weights)]
    try:
        return Path(
            snapshot_download(
                name,
                revision=plan.commit or revision,
                allow_patterns=patterns,
                tqdm_class=byte_counter(on_progress),
            )
        )
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(unavailable(exc, name, revision, host)) from exc
