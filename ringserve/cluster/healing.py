"""The keeper's decisions, as pure functions of what it saw: what happened to the ring, how
long to wait before the next start, which hosts to leave out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ringserve.cluster.processes import where
from ringserve.cluster.state import ProcessRecord
from ringserve.config.settings import HostSpec

# The wait before the n-th start in a row that did not last: none for the first, then doubling.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# A ring that served this long has recovered: the back-off starts over.
STABLE_S = 60.0
# Failures of one host within this window count together towards leaving it out.
HOST_FAILURE_WINDOW_S = 600.0
# Starts in a row that never served before the keeper gives up.
MAX_FAILED_STARTS = 5

Fate = Literal["alive", "died", "left", "unknown"]


@dataclass(frozen=True)
class RankFate:
    """What became of a rank: alive, died (it did not say why: killed, crashed), left the ring
    (`detail`: its reason), or unknown (`detail`: why its host could not be asked)."""

    record: ProcessRecord
    fate: Fate
    detail: str = ""


@dataclass(frozen=True)
class Fault:
    cause: str  # in general words, for anyone to read
    reason: str  # which ranks, PIDs and hosts
    failed_hosts: tuple[HostSpec, ...] = ()  # remote hosts to blame


def _named(record: ProcessRecord) -> str:
    return f"{record.name} (pid {record.pid} on {where(record)})"


def diagnose(fates: Sequence[RankFate]) -> Fault:
    """What happened to a ring whose ranks came to these fates. A rank that died, or whose
    host cannot be asked, is the fault; ranks that left the ring only followed it (unless every
    rank left: then their own words say what happened)."""
    died = [f for f in fates if f.fate == "died"]
    unknown = [f for f in fates if f.fate == "unknown"]
    left = [f for f in fates if f.fate == "left"]
    blamed = tuple(
        dict.fromkeys(f.record.remote for f in died + unknown if f.record.remote is not None)
    )
    if died:
        reason = "; ".join(f"{_named(f.record)} died" for f in died)
        return Fault("a rank died", reason, blamed)
    if unknown:
        reason = "; ".join(f"{f.record.name}: {f.detail}" for f in unknown)
        return Fault("a host cannot be reached", reason, blamed)
    if left:
        reason = "; ".join(f"{_named(f.record)} left the ring: {f.detail}" for f in left)
        alive = len(left) < len(fates)
        return Fault("a rank stopped answering" if alive else "the ring broke", reason)
    return Fault("the ring broke", "every rank is alive, but the ring does not serve")


def backoff_s(starts_in_a_row: int) -> float:
    """The wait before a start, after `starts_in_a_row` starts that did not last."""
    if starts_in_a_row <= 0:
        return 0.0
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (starts_in_a_row - 1))


@dataclass
class HostFailures:
    """When each remote host failed (its rank died, it could not be reached or used)."""

    limit: int
    times: dict[HostSpec, list[float]] = field(default_factory=dict)

    def add(self, host: HostSpec, now: float) -> None:
        self.times.setdefault(host, []).append(now)

    def failing(self, hosts: Sequence[HostSpec], now: float) -> list[HostSpec]:
        """The hosts that failed `limit` times within the window: to be left out."""
        since = now - HOST_FAILURE_WINDOW_S
        return [h for h in hosts if sum(t >= since for t in self.times.get(h, ())) >= self.limit]


def remaining_hosts(
    hosts: Sequence[HostSpec], left_out: Sequence[HostSpec]
) -> tuple[HostSpec, ...]:
    return tuple(h for h in hosts if h not in left_out)
