"""Which layout serves the model (tensor or pipeline), and the memory each rank may fill.

Pure functions of the settings and of what every rank reported about itself, so every rank
decides the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ringserve.config.settings import Settings
from ringserve.errors import ConfigError

Layout = Literal["single", "tensor", "pipeline"]
# Measured free memory moves between readings: budgets this close count as the same.
SAME_BUDGET = 0.9


@dataclass(frozen=True)
class RankMemory:
    """What one rank knows of itself before loading."""

    host_index: int  # in RINGSERVE_HOSTS; 0 when it is empty (every rank on this machine)
    free: int  # bytes its device has free (RAM of the whole host unless it owns a GPU)
    own_device: bool  # a GPU of its own (CUDA), rather than its host's RAM shared by its ranks


def configured_budget(settings: Settings, host_index: int) -> int | tuple[int, ...]:
    """The budget set for a host (its own, else RINGSERVE_MEMORY_BUDGET); 0 when none is."""
    # A rank that did not find its host (-1) has only the setting for every host.
    if settings.hosts and host_index >= 0 and settings.hosts[host_index].memory_budget is not None:
        budget = settings.hosts[host_index].memory_budget
        assert budget is not None
        return budget
    return settings.memory_budget


def rank_budgets(settings: Settings, ranks: Sequence[RankMemory]) -> list[int]:
    """Bytes of weights each rank may hold: its budget from the settings, else what its device
    has free; ranks sharing a host's RAM share it evenly unless the host lists one per rank."""
    budgets = []
    for rank, memory in enumerate(ranks):
        same_host = [r for r, m in enumerate(ranks) if m.host_index == memory.host_index]
        budget = configured_budget(settings, memory.host_index)
        if isinstance(budget, tuple):
            budgets.append(budget[same_host.index(rank)])
            continue
        whole = budget or memory.free
        budgets.append(whole if memory.own_device else whole // len(same_host))
    return budgets


def choose_layout(parallel: str, budgets: Sequence[int], divides: bool) -> Layout:
    """RINGSERVE_PARALLEL resolved for this ring: `auto` is tensor when every rank has the same
    memory and the model divides among them, pipeline otherwise."""
    if len(budgets) == 1:
        return "single"
    if parallel == "tensor":
        return "tensor"
    if parallel == "pipeline":
        return "pipeline"
    if parallel != "auto":
        raise ConfigError(f"RINGSERVE_PARALLEL={parallel!r}: use tensor, pipeline or auto")
    same = min(budgets) >= SAME_BUDGET * max(budgets)
    return "tensor" if same and divides else "pipeline"
