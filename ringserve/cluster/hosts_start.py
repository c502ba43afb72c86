"""Starting the ranks of a ClusterPlan: check every remote host, push, write files, start."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

from ringserve.cluster.cluster_plan import ClusterPlan
from ringserve.cluster.local import start_detached
from ringserve.cluster.push import PushSummary
from ringserve.cluster.remote import RemoteHost, local_versions
from ringserve.cluster.ssh import host_label
from ringserve.cluster.state import ProcessRecord, private_dir, write_private
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import RemoteHostError

log = logging.getLogger(__name__)


class HostsNotReady(RemoteHostError):
    """Hosts that could not be reached, checked or used; `failed`: each one's problem."""

    def __init__(self, failed: Mapping[HostSpec, str]) -> None:
        super().__init__(
            "these hosts are not ready, nothing was started:\n  " + "\n  ".join(failed.values())
        )
        self.failed = dict(failed)


@contextlib.contextmanager
def checked_hosts(
    hosts: list[HostSpec],
    settings: Settings,
    model_path: str,
    expected: Mapping[str, str] | None = None,
) -> Iterator[dict[HostSpec, RemoteHost]]:
    """Connect to and check every host; on any failure raise one line per failing host."""
    opened: dict[HostSpec, RemoteHost] = {}
    problems: dict[HostSpec, str] = {}
    try:
        for spec in hosts:
            try:
                host = RemoteHost.open(spec, settings)
            except RemoteHostError as exc:
                problems[spec] = str(exc)
                continue
            opened[spec] = host
            expected = local_versions() if expected is None else expected
            try:
                host.check(expected)
                check_model_there(host, model_path)
            except RemoteHostError as exc:
                problems[spec] = str(exc)
        if problems:
            raise HostsNotReady(problems)
        yield opened
    finally:
        for host in opened.values():
            host.close()


def check_model_there(host: RemoteHost, model_path: str) -> None:
    """A model served from a local directory must be at the same path on every host."""
    if not PurePosixPath(model_path).is_absolute():
        return  # a hub repo id: each host downloads (or finds in its cache) the same model
    config = str(PurePosixPath(model_path) / "config.json")
    sftp = host.session.sftp()
    try:
        sftp.stat(config)
    except OSError:
        raise RemoteHostError(
            f"{host.session.label}: the model is not at {model_path} there ({config} is "
            "missing); copy the model directory to the same path on every host, or set "
            "RINGSERVE_MODEL to a Hugging Face repo id"
        ) from None
    finally:
        sftp.close()


def push_to_hosts(
    hosts: Mapping[HostSpec, RemoteHost], project_dir: Path, show_progress: bool = True
) -> list[PushSummary]:
    return [host.push(project_dir, show_progress) for host in hosts.values()]


def start_planned_ranks(
    plan: ClusterPlan, hosts: Mapping[HostSpec, RemoteHost], started: list[ProcessRecord]
) -> None:
    """Write each rank's files and start it; `started` grows as ranks start, for cleanup."""
    for rank in plan.ranks:
        launch = rank.launch
        if rank.placement.is_local:
            for path, text in rank.files.items():
                private_dir(Path(path).parent)
                write_private(Path(path), text)
            process = start_detached(launch)
            remote = None
            log.info("rank %d started here, pid %d", launch.rank, process.pid)
        else:
            remote = rank.placement.host
            host = hosts[remote]
            try:
                host.write_files(rank.files)
                process = host.start(launch)
            except RemoteHostError as exc:
                raise HostsNotReady({remote: str(exc)}) from exc
        started.append(
            ProcessRecord(
                role="rank",
                rank=launch.rank,
                host="localhost" if remote is None else host_label(remote),
                pid=process.pid,
                log_path=process.log_path,
                remote=remote,
                identity=process.identity,
            )
        )
