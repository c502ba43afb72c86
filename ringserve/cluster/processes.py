"""The recorded processes of a run, wherever they run: alive or not, their memory, stopping them.

Local processes are asked directly; remote ones over one SSH connection per host. A host that
cannot be reached is reported with its processes, never allowed to stop the others being handled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringserve.cluster.local import rss_bytes, tail
from ringserve.cluster.process_identity import FOREIGN, GONE, OURS, ownership, stop_groups
from ringserve.cluster.remote import RemoteHost
from ringserve.cluster.ssh import host_label
from ringserve.cluster.state import ProcessRecord
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import RemoteHostError

log = logging.getLogger(__name__)
# Seconds a process has to end after SIGTERM before SIGKILL.
LOCAL_GRACE_S = 10.0
REMOTE_GRACE_S = 5.0


@dataclass(frozen=True)
class ProcessInfo:
    """`alive` is None when the process's host could not be asked (`problem` says why)."""

    alive: bool | None
    rss_bytes: int | None = None
    problem: str = ""


@dataclass
class StopReport:
    """What `stop` could not verify as stopped, and one line per reason."""

    left: list[ProcessRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def by_host(records: Sequence[ProcessRecord]) -> dict[HostSpec, list[ProcessRecord]]:
    """The remote records grouped by the host they run on, in the order first seen."""
    groups: dict[HostSpec, list[ProcessRecord]] = {}
    for record in records:
        if record.remote is not None:
            groups.setdefault(record.remote, []).append(record)
    return groups


def where(record: ProcessRecord) -> str:
    return "this machine" if record.remote is None else host_label(record.remote)


def probe(records: Sequence[ProcessRecord], settings: Settings) -> list[ProcessInfo]:
    """Alive and resident memory of each record, in the records' order."""
    found: dict[int, ProcessInfo] = {}
    for index, record in enumerate(records):
        if record.remote is None:
            owner = ownership(record.pid, record.identity)
            alive = owner == OURS
            found[index] = ProcessInfo(
                alive, rss_bytes(record.pid) if alive else None, _foreign(record, owner)
            )
    for spec, group in by_host(records).items():
        indices = [i for i, r in enumerate(records) if r.remote == spec]
        try:
            with RemoteHost.open(spec, settings) as host:
                answers = host.process_info({r.pid: r.identity for r in group})
            infos = []
            for record in group:
                owner, rss = answers.get(record.pid, (GONE, None))
                infos.append(ProcessInfo(owner == OURS, rss, _foreign(record, owner)))
        except RemoteHostError as exc:
            infos = [ProcessInfo(None, None, str(exc)) for _ in group]
        found.update(zip(indices, infos, strict=True))
    return [found[index] for index in range(len(records))]


def _foreign(record: ProcessRecord, owner: str) -> str:
    if owner != FOREIGN:
        return ""
    return (
        f"pid {record.pid} is not the process {record.name} was started as (another process "
        "has that PID now, or the run was recorded without identities); it is left alone"
    )


# The order processes stop in: the keeper (which would restart the others), the API, the ranks.
STOP_ORDER = ("keeper", "api", "rank")


def stop_records(
    records: Sequence[ProcessRecord], settings: Settings, grace: float = LOCAL_GRACE_S
) -> StopReport:
    """Stop the keeper and the API first, then every rank on every host; verify each is gone.
    A PID that now belongs to another process is never signalled. `grace`: seconds each has to
    end after SIGTERM before SIGKILL."""
    report = StopReport()
    for role in STOP_ORDER:
        mine = [r for r in records if r.role == role]
        local = [r for r in mine if r.remote is None]
        outcome = stop_groups({r.pid: r.identity for r in local}, grace)
        for record in local:
            _report(record, outcome[record.pid], report)
        for spec, group in by_host(mine).items():
            _stop_on_host(spec, group, settings, report, grace)
    return report


def _report(record: ProcessRecord, outcome: str, report: StopReport) -> None:
    if outcome == FOREIGN:
        log.warning("%s", _foreign(record, outcome))
    elif outcome.startswith("left"):
        report.left.append(record)
        report.problems.append(
            f"{record.name} (pid {record.pid} on {where(record)}) survived SIGKILL "
            f"(pids {outcome[5:]}); stop them by hand"
        )


def _stop_on_host(
    spec: HostSpec,
    group: list[ProcessRecord],
    settings: Settings,
    report: StopReport,
    grace: float,
) -> None:
    try:
        host = RemoteHost.open(spec, settings)
    except RemoteHostError as exc:
        report.left.extend(group)
        pids = ", ".join(str(r.pid) for r in group)
        report.problems.append(f"{exc} — its processes (pids {pids}) may still run there")
        return
    with host:
        try:
            outcome = host.stop({r.pid: r.identity for r in group}, min(grace, REMOTE_GRACE_S))
        except RemoteHostError as exc:
            report.left.extend(group)
            report.problems.append(str(exc))
            return
        for record in group:
            _report(record, outcome.get(record.pid, GONE), report)


def log_tail(record: ProcessRecord, settings: Settings, lines: int = 30) -> str:
    """The end of a process's log, read over SSH when it runs elsewhere."""
    if record.remote is None:
        return tail(Path(record.log_path), lines)
    with RemoteHost.open(record.remote, settings) as host:
        return host.log_tail(record.log_path, lines)
