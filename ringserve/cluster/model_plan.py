"""Where a hub model comes from and what each host of the ring needs of it, decided on the
launching host from what every host reported: pure functions, no host is contacted here.

One host is the origin: the launching host if it holds the revision, else the first host (in
RINGSERVE_HOSTS order) that holds it, else the launching host after downloading it. Every other
host receives from it only the files its ranks need: under a pipeline, the config, tokenizer and
the safetensors files holding its ranks' layers (a file mixing layers of several hosts goes to
each); under a tensor split, every file. The split is the one the ranks would compute from the
same budgets, and they are given it (RINGSERVE_PIPELINE_SPLIT), so the files a host received
are the files its ranks load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ringserve.cluster.hosts import Placement
from ringserve.config.settings import Settings
from ringserve.distributed.layer_files import FileLayers, files_for
from ringserve.distributed.layer_split import (
    ModelSizes,
    check_split,
    layer_ranges,
    pipeline_split,
)
from ringserve.distributed.layout import Layout, RankMemory, choose_layout, rank_budgets
from ringserve.errors import MemoryCheckError, ModelUnavailableError
from ringserve.model.prepare import Prepared
from ringserve.model.store import CachedFile
from ringserve.platform.preflight import HostMemory
from ringserve.telemetry.memory import human_bytes


@dataclass(frozen=True)
class ModelReady:
    """The model on every host, and what the ranks are told of it: the commit every host holds
    and, for a pipeline whose hosts hold only their layers' files, the split those are for."""

    hosts: dict[str, Prepared]
    commit: str | None = None
    split: tuple[int, ...] = ()


@dataclass(frozen=True)
class Origin:
    """The host every other host receives the model from, at one commit."""

    host: str
    commit: str
    download: bool  # it downloads what it lacks from the hub first


def check_same_revision(name: str, commits: Mapping[str, str]) -> None:
    """Hosts that each hold or resolved the model must agree on its commit: ranks loading
    different weights would answer nonsense, or a pipeline's ranks would split different
    layers."""
    if len(set(commits.values())) > 1:
        each = "; ".join(f"{label}: {commit[:12]}" for label, commit in commits.items())
        raise ModelUnavailableError(
            f"model {name}: the hosts have different revisions of it ({each}); "
            "set RINGSERVE_MODEL_REVISION to one commit, or let every host reach the hub"
        )


def choose_origin(
    name: str, checked: Mapping[str, Prepared], order: Sequence[str], here: str
) -> Origin | None:
    """The commit is the hub's where a host reached it, else the one the hosts holding the
    whole model hold; the origin holds it whole (the launching host first, then the others in
    order), else it is this host, which downloads it. None: no host holds it and this host
    cannot download it."""
    reached = {label: p.commit for label, p in checked.items() if p.reached_hub and p.commit}
    check_same_revision(name, reached)
    holders = [
        label for label in order if checked[label].source == "cache" and checked[label].commit
    ]
    if reached:
        commit = next(iter(reached.values()))
    else:
        held = {label: checked[label].commit or "" for label in holders}
        check_same_revision(name, held)
        if not held:
            return None
        commit = next(iter(held.values()))
    for label in holders:
        if checked[label].commit == commit:
            return Origin(label, commit, download=False)
    if here in reached:
        return Origin(here, commit, download=True)
    return None


@dataclass(frozen=True)
class Shares:
    """How the ranks will split the model and the weight files each host's ranks need."""

    layout: Layout
    split: tuple[int, ...]  # a pipeline's layers per rank, rank 0 first; () otherwise
    files: dict[int, frozenset[str]]  # by host index in RINGSERVE_HOSTS


def plan_shares(
    settings: Settings,
    placements: Sequence[Placement],
    memory: Mapping[int, HostMemory],
    sizes: ModelSizes,
    layers_of: Mapping[str, FileLayers],
    tensor_splits: bool,
    pipeline_splits: bool,
) -> Shares:
    """The layout and split the ranks would choose from these budgets (as `plan_layout` does on
    every rank), and each host's files. MemoryCheckError when a pipeline does not fit."""
    ranks = len(placements)
    everything = frozenset(layers_of)
    hosts = {p.host_index for p in placements}
    if ranks == 1 or settings.parallel == "tensor" or not pipeline_splits:
        layout: Layout = "single" if ranks == 1 else "tensor"
        return Shares(layout, (), dict.fromkeys(hosts, everything))
    rank_memory = [
        RankMemory(p.host_index, memory[p.host_index].device_free, memory[p.host_index].own_device)
        for p in placements
    ]
    budgets = rank_budgets(settings, rank_memory)
    if settings.pipeline_split:
        check_split(sizes, settings.pipeline_split, budgets, model_name=settings.model)
        split = list(settings.pipeline_split)
    elif choose_layout(settings.parallel, budgets, tensor_splits) == "tensor":
        return Shares("tensor", (), dict.fromkeys(hosts, everything))
    else:
        split = pipeline_split(sizes, budgets, model_name=settings.model)
    ranges = layer_ranges(split)
    files: dict[int, frozenset[str]] = {}
    for placement in placements:
        own = files_for(layers_of, ranges[placement.rank])
        files[placement.host_index] = files.get(placement.host_index, frozenset()) | own
    return Shares("pipeline", tuple(split), files)


def wanted_files(
    manifest: Mapping[str, CachedFile], weights: frozenset[str]
) -> dict[str, CachedFile]:
    """What a host holds of the model: every file but the weights, and these weights."""
    return {
        name: cached
        for name, cached in manifest.items()
        if not name.endswith(".safetensors") or name in weights
    }


def still_needed(
    wanted: Mapping[str, CachedFile], held: Prepared, commit: str, checked: bool = True
) -> dict[str, CachedFile]:
    """The wanted files the host does not hold in this commit's snapshot (`checked`: checked
    against their hash by a copy to it, and not changed since)."""
    holding = held.holding
    if holding is None or holding.commit != commit:
        return dict(wanted)
    return {
        name: cached
        for name, cached in wanted.items()
        if holding.files.get(name) != cached or (checked and name not in holding.checked)
    }


def check_disk_room(name: str, label: str, needed: int, held: Prepared) -> None:
    """Refuse a copy the host's cache disk cannot hold."""
    free = held.holding.free if held.holding is not None else 0
    if needed > free:
        where = held.holding.repo_dir if held.holding is not None else "its cache"
        raise MemoryCheckError(
            f"model {name} on {label}: the copy needs {human_bytes(needed)} but {where} has "
            f"{human_bytes(free)} free; free disk space there, or point its hf_home in "
            "RINGSERVE_HOSTS at a larger disk"
        )
