"""The keeper: the process `launch.py start` leaves behind to keep the ring serving.

It looks at the run twice a second. When a rank on this machine is gone (a rank that loses a
peer leaves the ring and exits, so rank 0 going is how a remote fault shows here too), it finds
out what happened (which ranks died, which left and why, which hosts cannot be reached), stops
what is left of the ring and starts it again on the same hosts, with back-off when restarts do
not last. The API stays up throughout and holds the requests that were waiting. A remote host
that keeps failing (its rank dies again, it cannot be reached over SSH) is left out, and the
model is split again over the remaining hosts, as a pipeline; when that cannot serve (the model
does not fit them, say), or starts keep failing, the keeper says in one line why it cannot go
on and stops. When the API process dies, it starts it again.

What it saw goes to its report in the run directory (ipc/keeper_report.py), which the API
reads; its log is logs/keeper.log. `launch.py stop` stops it first.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from rich.console import Console

from ringserve.cluster.api_process import restart_api
from ringserve.cluster.healing import (
    MAX_FAILED_STARTS,
    STABLE_S,
    Fault,
    HostFailures,
    RankFate,
    backoff_s,
    diagnose,
    remaining_hosts,
)
from ringserve.cluster.hosts_start import HostsNotReady
from ringserve.cluster.local import tail
from ringserve.cluster.process_identity import OURS, ownership
from ringserve.cluster.processes import by_host, probe, stop_records, where
from ringserve.cluster.remote import RemoteHost
from ringserve.cluster.run_lock import run_lock
from ringserve.cluster.ssh import host_label
from ringserve.cluster.state import (
    ProcessRecord,
    RunState,
    load_state,
    replace_role,
    update_state,
)
from ringserve.cluster.supervisor import Supervisor
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import LaunchError, ProtocolError, RemoteHostError
from ringserve.ipc.client import ask_rank0
from ringserve.ipc.keeper_report import (
    KEEPER_POLL_S,
    KeeperReport,
    cannot_serve_reason,
    left_ring_reason,
    write_report,
)
from ringserve.ipc.messages import ClusterInfo, InfoRequest

log = logging.getLogger(__name__)
# What is left of a broken ring gets this long to end after SIGTERM before SIGKILL (a rank
# stuck inside a collective never gets to run its SIGTERM handler).
RESTART_GRACE_S = 0.5
# How often a starting ring's remote ranks are asked whether they still run.
REMOTE_POLL_S = 2.0
INFO_TIMEOUT_S = 2.0
LOG_LINES = 200


class Stopping(Exception):
    """SIGTERM: `launch.py stop` is stopping the run."""


class GaveUp(Exception):
    """The ring cannot be brought back; the report says why."""


class StartFailed(Exception):
    """A restart did not reach serving. `hosts`: remote hosts to blame; `final`: a rank stopped
    on an error a new start would meet again."""

    def __init__(self, reason: str, hosts: Sequence[HostSpec] = (), final: bool = False) -> None:
        super().__init__(reason)
        self.hosts = tuple(hosts)
        self.final = final


class Keeper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.console = Console(stderr=True, highlight=False)
        self.failures = HostFailures(settings.host_failure_limit)
        self.left_out: list[str] = []  # host labels, in the order they were left out
        self.report = KeeperReport(pid=os.getpid(), looked_at=time.time())
        self.starts_in_a_row = 0  # starts that did not last STABLE_S
        self.serving_since = time.monotonic()
        self.served = False  # the ring `start` started has served (until then, `start` watches)

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        def stopping(signum: int, frame: FrameType | None) -> None:
            raise Stopping

        signal.signal(signal.SIGTERM, stopping)
        log.info("keeping the ring in %s serving", self.run_dir)
        try:
            while True:
                state = load_state(self.run_dir)
                if state is None:
                    log.info("no run is recorded any more: nothing to keep")
                    return 0
                self.look(state)
                time.sleep(KEEPER_POLL_S)
        except Stopping:
            log.info("stopped")
            return 0
        except GaveUp:
            return 1

    def look(self, state: RunState) -> None:
        if not self.served:
            self.served = _serving(self.settings.rank_socket)
        elif any(r.local and not _alive_here(r) for r in state.ranks):
            self.heal(state)
        elif self.starts_in_a_row and time.monotonic() - self.serving_since > STABLE_S:
            self.starts_in_a_row = 0
        if self.served:
            self._keep_api(state)
        self._publish()

    def _publish(self, **changes: object) -> None:
        update = {**changes, "looked_at": time.time(), "keeping": self.served}
        self.report = self.report.model_copy(update=update)
        write_report(self.run_dir, self.report)

    def _sleep(self, seconds: float) -> None:
        """Wait, still telling the API the keeper is there."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, KEEPER_POLL_S))
            self._publish()

    # --- the API ------------------------------------------------------------------------------
    def _keep_api(self, state: RunState) -> None:
        api = state.of_role("api")
        if not api or _alive_here(api[0]):
            return
        try:
            with run_lock(self.run_dir, wait=0):  # a person's restart-api or stop goes first
                now = load_state(self.run_dir)
                if now is None or now.of_role("api") != api:
                    return
                reason = f"the API (pid {api[0].pid}) died"
                log.warning("%s: starting it again", reason)
                self._count("the API died", reason)
                record = restart_api(self.settings)
                log.info("the API runs again (pid %d)", record.pid)
        except LaunchError as exc:
            log.debug("the API is gone, but %s", exc)

    def _count(self, cause: str, reason: str, restarting: bool = False) -> None:
        self._publish(
            restarts=self.report.restarts + 1,
            last_cause=cause,
            last_reason=reason,
            last_at=time.time(),
            restarting=restarting,
        )

    # --- the ring -----------------------------------------------------------------------------
    def heal(self, state: RunState) -> None:
        """Find out what happened to the ring, stop what is left of it and start it again, until
        it serves (or the keeper gives up)."""
        fates = self._fates(state.ranks)
        fault = diagnose(fates)
        self._blame(fault.failed_hosts, fault.reason)
        self._count(fault.cause, fault.reason, restarting=True)
        log.warning("the ring broke (%s): restarting it", fault.reason)
        leftover = [f.record for f in fates if f.fate in ("alive", "unknown")]
        stop_records(leftover, self.settings, RESTART_GRACE_S)
        failed_starts = 0
        while True:
            self._leave_out_failing(fault)
            self._sleep(backoff_s(self.starts_in_a_row))
            self.starts_in_a_row += 1
            try:
                self._start_and_wait(state)
                break
            except StartFailed as failed:
                failed_starts += 1
                self._blame(failed.hosts, str(failed))
                log.warning("the restart failed: %s", failed)
                if failed.final or failed_starts >= MAX_FAILED_STARTS:
                    self._give_up(str(failed), failed_starts)
        self.serving_since = time.monotonic()
        log.info("the ring serves again (restart %d)", self.report.restarts)
        self._publish(restarting=False)

    def _blame(self, hosts: Sequence[HostSpec], why: str) -> None:
        for host in hosts:
            self.failures.add(host, time.monotonic())
            log.warning("host %s failed: %s", host_label(host), why)

    def _leave_out_failing(self, fault: Fault) -> None:
        remaining = remaining_hosts(self.settings.hosts, self._left_out_specs())
        for host in self.failures.failing(remaining, time.monotonic()):
            label = host_label(host)
            self.left_out.append(label)
            log.warning(
                "leaving host %s out: it failed %d times (last: %s); the model is split again "
                "over the remaining hosts",
                label,
                self.settings.host_failure_limit,
                fault.reason,
            )
            self._publish(left_out=tuple(self.left_out))

    def _left_out_specs(self) -> list[HostSpec]:
        return [h for h in self.settings.hosts if host_label(h) in self.left_out]

    def ring_settings(self, state: RunState) -> Settings:
        """The settings a restart starts the ranks with: the hosts not left out (the model split
        over them as a pipeline), at the revision and split `start` pinned (the split the
        hosts' copies of the model are for; with hosts left out the ranks split anew, and a
        host that lacks files its new layers need is named when the ranks load)."""
        update: dict[str, object] = {"pipeline_split": state.pipeline_split}
        if self.left_out:
            hosts = remaining_hosts(self.settings.hosts, self._left_out_specs())
            update["hosts"] = hosts
            update["pipeline_split"] = ()
            if sum(h.ranks for h in hosts) > 1:
                update["parallel"] = "pipeline"
        if state.model_revision:
            update["model_revision"] = state.model_revision
        return self.settings.model_copy(update=update)

    def _start_and_wait(self, state: RunState) -> None:
        settings = self.ring_settings(state)
        supervisor = Supervisor(settings, self.console)
        try:
            records = supervisor.start_ranks(state.model, prepare=False, fresh_logs=False)
        except HostsNotReady as exc:
            raise StartFailed(str(exc), tuple(exc.failed)) from exc
        except LaunchError as exc:
            raise StartFailed(str(exc)) from exc
        try:
            update_state(self.run_dir, lambda now: replace_role(now, "rank", records))
            self._wait_serving(records, settings)
        except BaseException:
            stop_records(records, self.settings, RESTART_GRACE_S)
            raise

    def _wait_serving(self, records: list[ProcessRecord], settings: Settings) -> None:
        """Until rank 0 says the ring serves; a rank that exits meanwhile fails the start."""
        deadline = time.monotonic() + settings.start_timeout
        remote = [r for r in records if not r.local]
        next_remote = time.monotonic() + REMOTE_POLL_S
        while time.monotonic() < deadline:
            dead = [r for r in records if r.local and not _alive_here(r)]
            if remote and time.monotonic() >= next_remote:
                infos = probe(remote, settings)
                dead += [r for r, info in zip(remote, infos, strict=True) if info.alive is False]
                next_remote = time.monotonic() + REMOTE_POLL_S
            if dead:
                raise self._start_failure(dead)
            if _serving(settings.rank_socket):
                return
            self._sleep(KEEPER_POLL_S)
        raise StartFailed(f"the ring did not serve within {settings.start_timeout:.0f} s")

    def _start_failure(self, dead: list[ProcessRecord]) -> StartFailed:
        """A start some ranks did not survive: an error of their own ends it for good."""
        fates = self._fates(dead)
        for fate in fates:
            said = cannot_serve_reason(self._log_tail(fate.record), fate.record.pid)
            if said is not None:
                return StartFailed(f"{fate.record.name} cannot serve: {said}", final=True)
        fault = diagnose(fates)
        return StartFailed(f"{fault.reason} while starting", fault.failed_hosts)

    def _give_up(self, why: str, attempts: int) -> None:
        left = f" (hosts left out: {', '.join(self.left_out)})" if self.left_out else ""
        line = f"the ring cannot be restarted after {attempts} attempt(s){left}: {why}"
        log.error("giving up: %s", line)
        self._publish(restarting=False, gave_up=line)
        raise GaveUp(line)

    # --- what became of the ranks ---------------------------------------------------------------
    def _fates(self, ranks: Sequence[ProcessRecord]) -> list[RankFate]:
        found: dict[int, RankFate] = {}
        for index, record in enumerate(ranks):
            if record.local:
                found[index] = self._fate(record, _alive_here(record), self._log_tail(record))
        for spec, group in by_host(ranks).items():
            indices = [i for i, r in enumerate(ranks) if r.remote == spec]
            try:
                with RemoteHost.open(spec, self.settings) as host:
                    answers = host.process_info({r.pid: r.identity for r in group})
                    fates = []
                    for record in group:
                        alive = answers.get(record.pid, ("gone", None))[0] == OURS
                        text = "" if alive else host.log_tail(record.log_path, LOG_LINES)
                        fates.append(self._fate(record, alive, text))
            except RemoteHostError as exc:
                fates = [RankFate(r, "unknown", str(exc)) for r in group]
            found.update(zip(indices, fates, strict=True))
        return [found[i] for i in range(len(ranks))]

    def _fate(self, record: ProcessRecord, alive: bool, log_text: str) -> RankFate:
        if alive:
            return RankFate(record, "alive")
        said = left_ring_reason(log_text, record.pid)
        return RankFate(record, "died") if said is None else RankFate(record, "left", said)

    def _log_tail(self, record: ProcessRecord) -> str:
        if record.remote is None:
            return tail(Path(record.log_path), LOG_LINES)
        try:
            with RemoteHost.open(record.remote, self.settings) as host:
                return host.log_tail(record.log_path, LOG_LINES)
        except RemoteHostError as exc:
            log.info("cannot read the log of %s on %s: %s", record.name, where(record), exc)
            return ""


def _alive_here(record: ProcessRecord) -> bool:
    return ownership(record.pid, record.identity) == OURS


def _serving(socket_path: Path) -> bool:
    try:
        info = ask_rank0(socket_path, InfoRequest(), INFO_TIMEOUT_S)
    except (OSError, ProtocolError):
        return False
    return isinstance(info, ClusterInfo) and info.ready
