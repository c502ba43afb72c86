"""The model on one host before any rank starts: checked (files, architecture, heads, memory,
disk), then fetched, or what the host's cache holds of it reported, for `start` to copy it there
from another host, and the received files put in place. Runs in `launch.py` for this machine
and, over SSH, on every other host (`launch.py prepare-model`, which speaks the JSON lines
defined here)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ringserve.config.settings import Settings, load_settings
from ringserve.errors import ModelError, RingserveError
from ringserve.model import store
from ringserve.model.source import (
    check_model_dir,
    looks_like_hub_id,
    missing_indexed_weights,
    quantization,
    read_config,
    weight_files,
    where,
)
from ringserve.model.store import CachedFile, Holding, Settled
from ringserve.platform.preflight import HostMemory

Progress = Callable[[int, int], None]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrepareRequest(Message):
    """What `launch.py prepare-model` reads on stdin."""

    # check: the model here, fetched from nowhere yet; fetch: downloaded from the hub;
    # settle: files another host copied here checked and put in place (`wanted`).
    phase: Literal["check", "fetch", "settle"]
    host: str  # how messages name the host
    settings: dict[str, str]  # the RINGSERVE_ variables, as a rank gets them
    environment: dict[str, str] = {}  # HF_* variables set before huggingface_hub is imported
    # check: the host receives a hub model from another host, so only its cache is looked at.
    receives: bool = False
    weights: list[str] | None = None  # fetch: only these weight files (a pipeline host's share)
    wanted: dict[str, CachedFile] = {}  # settle: the snapshot's files this host must hold
    revision: str = ""  # settle: the branch or tag to point at the commit (the settings')


class Prepared(Message):
    """The model on one host: where it is and what is left to fetch."""

    host: str
    path: str  # "" where the cache holds no snapshot of it yet
    # cache: every file is here; hub: files to download; copy: files to receive from a host
    source: Literal["directory", "cache", "hub", "copy"]
    commit: str | None = None
    model_type: str = ""  # "" where the host has not read the config (it receives it)
    quantization: str | None = None
    weight_bytes: int
    # What this host's ranks may hold in weights together (its budget, else what is free).
    weight_room: int = 0
    missing_bytes: int = 0
    missing_files: int = 0
    seconds: float = 0.0
    reached_hub: bool = False  # the revision was resolved on the hub, not from the cache
    holding: Holding | None = None  # a hub model: what the cache holds of it
    memory: HostMemory | None = None


class ProgressLine(Message):
    done: int
    total: int


class Failure(Message):
    message: str
    exit_code: int


def tensor_expected(settings: Settings, model_dir: Path) -> bool:
    """Whether the ranks will split the model as tensors (so every rank needs an even share):
    `tensor`, one rank, or `auto` on one machine (its ranks' budgets are alike) with a model
    a tensor split can cut."""
    if settings.parallel == "tensor" or settings.world_size == 1:
        return True
    if settings.parallel != "auto" or settings.hosts:
        return False
    from ringserve.model.splits import tensor_splits  # MLX, only once there is a model

    try:
        config = json.loads((model_dir / "config.json").read_text())
        return tensor_splits(model_dir, config, settings.world_size, settings.trust_remote_code)
    except (ModelError, OSError, ValueError):
        return False


def check_here(
    settings: Settings, host: str, receives: bool = False, weights: Collection[str] | None = None
) -> Prepared:
    """Check the configured model on this host without downloading any weight; `receives`: a hub
    model this host receives from another is only looked for in its cache; `weights`: only
    these weight files are wanted (a pipeline host's share)."""
    from ringserve.platform.device import current_platform
    from ringserve.platform.preflight import check_host_memory, host_memory, host_weight_room

    name, trust = settings.model, settings.trust_remote_code
    ranks, parallel = settings.world_size, settings.parallel
    platform = current_platform()

    def check_memory(model_dir: Path, weight_bytes: int) -> None:
        """An even share on each rank is checked here where the layout will be a tensor split:
        `tensor`, one rank, or `auto` on one machine (its ranks' budgets are alike) with a
        model a tensor split can cut."""
        if tensor_expected(settings, model_dir):
            check_host_memory(settings, weight_bytes, name, platform, host)

    if not looks_like_hub_id(name):
        local = Path(name).expanduser().resolve()
        facts = check_model_dir(local, name, host, ranks, trust, parallel=parallel)
        check_memory(facts.path, facts.weight_bytes)
        return Prepared(
            host=host,
            path=str(facts.path.resolve()),
            source="directory",
            model_type=facts.model_type,
            quantization=facts.quantization,
            weight_bytes=facts.weight_bytes,
            weight_room=host_weight_room(settings, platform),
        )
    if receives:
        return survey_here(settings, host)
    from ringserve.model.hub import NotCached, check_disk, plan_fetch

    revision = settings.model_revision or None
    plan = plan_fetch(name, revision, host, weights)
    facts = check_model_dir(plan.path, name, host, ranks, trust, False, parallel)
    missing = [
        file for file in missing_indexed_weights(plan.path) if weights is None or file in weights
    ] or (not weight_files(plan.path) and ["weights"])
    if not plan.reached_hub and missing:
        raise NotCached(
            f"{where(name, host)}: the cache ({plan.path}) holds its other files but not "
            f"{', '.join(missing[:3])}; start with the hub reachable (HF_HUB_OFFLINE unset) to "
            "fetch them, or set RINGSERVE_MODEL to a complete local model"
        )
    if plan.reached_hub and not plan.weight_bytes:
        raise ModelError(
            f"{where(name, host)}: the repo has no *.safetensors weights, which mlx-lm loads; "
            "choose an MLX conversion of it (for instance from mlx-community)"
        )
    check_memory(plan.path, plan.weight_bytes)
    check_disk(plan, name, host)
    return Prepared(
        host=host,
        path=str(plan.path),
        source="hub" if plan.missing_files else "cache",
        commit=plan.commit,
        model_type=facts.model_type,
        quantization=facts.quantization,
        weight_bytes=plan.weight_bytes,
        weight_room=host_weight_room(settings, platform),
        missing_bytes=plan.missing_bytes,
        missing_files=plan.missing_files,
        reached_hub=plan.reached_hub,
        holding=store.holding(name, plan.path),
        memory=host_memory(settings, platform),
    )


def survey_here(settings: Settings, host: str) -> Prepared:
    """What this host's cache holds of a hub model another host will copy here (the hub is not
    asked): `cache` when it holds every file, `copy` otherwise. The launcher checks the model
    itself (every host runs the same mlx-lm) and this host's memory from what it reports."""
    from ringserve.model.hub import find_snapshot
    from ringserve.platform.device import current_platform
    from ringserve.platform.preflight import host_memory, host_weight_room

    name = settings.model
    platform = current_platform()
    snapshot = find_snapshot(name, settings.model_revision or None)
    held = store.holding(name, snapshot)
    config: dict[str, object] = {}
    if snapshot is not None and (snapshot / "config.json").is_file():
        config = read_config(snapshot, name, host, "its cache is damaged")
    weights = [file for file in held.files if file.endswith(".safetensors")]
    complete = bool(config) and bool(weights) and not missing_indexed_weights(snapshot or Path())
    model_type = config.get("model_type")
    return Prepared(
        host=host,
        path=str(snapshot or ""),
        source="cache" if complete else "copy",
        commit=held.commit,
        model_type=model_type if isinstance(model_type, str) else "",
        quantization=quantization(config) if config else None,
        weight_bytes=sum(held.files[file].size for file in weights),
        weight_room=host_weight_room(settings, platform),
        holding=held,
        memory=host_memory(settings, platform),
    )


def fetch_here(
    settings: Settings,
    checked: Prepared,
    on_progress: Progress,
    weights: Collection[str] | None = None,
) -> Prepared:
    """Download what `checked` found missing (of `weights` only, when given), then check the
    snapshot holds it."""
    if not checked.missing_files:
        return checked
    from ringserve.model.hub import HubPlan, download

    started = time.monotonic()
    name, revision = settings.model, settings.model_revision or None
    plan = HubPlan(
        Path(checked.path),
        checked.commit,
        checked.weight_bytes,
        checked.missing_bytes,
        checked.missing_files,
        reached_hub=True,
    )
    path = download(name, plan, revision, checked.host, on_progress, weights)
    check_model_dir(
        path,
        name,
        checked.host,
        settings.world_size,
        settings.trust_remote_code,
        need_weights=weights is None,
        parallel=settings.parallel,
    )
    return checked.model_copy(
        update={
            "path": str(path),
            "seconds": time.monotonic() - started,
            "holding": store.holding(name, path),
        }
    )


def _emit(message: BaseModel) -> None:
    print(json.dumps({type(message).__name__: message.model_dump()}), flush=True)


def serve_request(stdin_text: str) -> int:
    """`launch.py prepare-model`: one request on stdin, JSON lines on stdout, exit 0 or the
    error's exit code (the last line says why)."""
    try:
        request = PrepareRequest.model_validate_json(stdin_text)
        os.environ.update(request.environment)  # before huggingface_hub reads its settings
        settings = load_settings(Path(os.devnull), request.settings)
        if request.phase == "settle":
            _emit(
                store.settle(
                    settings.model, settings.model_revision, request.revision, request.wanted
                )
            )
            return 0
        checked = check_here(settings, request.host, request.receives, request.weights)
        if request.phase == "fetch":
            last = [0.0]

            def report(done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] >= 0.2 or done >= total:
                    last[0] = now
                    _emit(ProgressLine(done=done, total=total))

            checked = fetch_here(settings, checked, report, request.weights)
        _emit(checked)
        return 0
    except RingserveError as exc:
        _emit(Failure(message=str(exc), exit_code=exc.exit_code))
        return exc.exit_code
    except Exception as exc:  # reported as one line; the traceback goes to stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        _emit(Failure(message=f"{type(exc).__name__}: {exc}", exit_code=1))
        return 1


Reply = Prepared | ProgressLine | Failure | Settled


def parse_line(line: str) -> Reply | None:
    """One line of `prepare-model` output; None for anything else it printed."""
    try:
        found = json.loads(line)
    except ValueError:
        return None
    if not isinstance(found, dict) or len(found) != 1:
        return None
    kind, body = next(iter(found.items()))
    types: dict[str, type[Reply]] = {
        "Prepared": Prepared,
        "ProgressLine": ProgressLine,
        "Failure": Failure,
        "Settled": Settled,
    }
    return types[kind].model_validate(body) if kind in types else None
