"""The recorded processes of a run, wherever they run: alive or not, their memory, stopping them.

Local processes are asked directly; remote ones over one SSH connection per host. A host that
cannot be reached is reported with its processes, never allowed to stop the others being handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringserve.cluster.local import pid_alive, rss_bytes, stop_groups, tail
from ringserve.cluster.remote import RemoteHost
from ringserve.cluster.ssh import host_label
from ringserve.cluster.state import ProcessRecord
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import RemoteHostError


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
            alive = pid_alive(record.pid)
            found[index] = ProcessInfo(alive, rss_bytes(record.pid) if alive else None)
    for spec, group in by_host(records).items():
        indices = [i for i, r in enumerate(records) if r.remote == spec]
        try:
            with RemoteHost.open(spec, settings) as host:
                answers = host.process_info([r.pid for r in group])
            infos = [ProcessInfo(*answers.get(r.pid, (False, None))) for r in group]
        except RemoteHostError as exc:
            infos = [ProcessInfo(None, None, str(exc)) for _ in group]
        found.update(zip(indices, infos, strict=True))
    return [found[index] for index in range(len(records))]


def stop_records(records: Sequence[ProcessRecord], settings: Settings) -> StopReport:
    """Stop the API first, then every rank on every host; verify each is gone."""
    report = StopReport()
    for role in ("api", "rank"):
        mine = [r for r in records if r.role == role]
        local = [r for r in mine if r.remote is None]
        survivors = set(stop_groups([r.pid for r in local]))
        for record in local:
            if record.pid in survivors:
                report.left.append(record)
                report.problems.append(f"{record.name} (pid {record.pid}) survived SIGKILL")
        for spec, group in by_host(mine).items():
            _stop_on_host(spec, group, settings, report)
    return report


def _stop_on_host(
    spec: HostSpec, group: list[ProcessRecord], settings: Settings, report: StopReport
) -> None:
    try:
        host = RemoteHost.open(spec, settings)
    except RemoteHostError as exc:
        report.left.extend(group)
        pids = ", ".join(str(r.pid) for r in group)
        report.problems.append(f"{exc} — its processes (pids {pids}) may still run there")
        return
    with host:
        for record in group:
            try:
                host.stop(record.pid)
            except RemoteHostError as exc:
                report.left.append(record)
                report.problems.append(str(exc))


def log_tail(record: ProcessRecord, settings: Settings, lines: int = 30) -> str:
    """The end of a process's log, read over SSH when it runs elsewhere."""
    if record.remote is None:
        return tail(Path(record.log_path), lines)
    with RemoteHost.open(record.remote, settings) as host:
        return host.log_tail(record.log_path, lines)
