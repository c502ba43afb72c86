"""The controller behind `launch.py`: start, stop and report every process of a run.

(Not to be confused with the keeper, cluster/keeper.py: the process `start` leaves behind to
restart a ring that lost a rank. It starts ranks through `Supervisor.start_ranks`.)"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console

from ringserve.cluster.api_process import api_record, start_api
from ringserve.cluster.cluster_plan import plan_cluster
from ringserve.cluster.hosts_start import checked_hosts, push_to_hosts, start_planned_ranks
from ringserve.cluster.keeper_process import start_keeper
from ringserve.cluster.local import start_detached
from ringserve.cluster.model_plan import ModelReady
from ringserve.cluster.model_prep import prepare_model
from ringserve.cluster.process_identity import OURS, ownership
from ringserve.cluster.processes import ProcessInfo, StopReport, log_tail, probe, stop_records
from ringserve.cluster.spec import RankLaunch, RankProcess
from ringserve.cluster.state import (
    ProcessRecord,
    RunState,
    clear_state,
    load_state,
    private_dir,
    save_state,
    write_private,
)
from ringserve.config.settings import PROJECT_DIR, RUN_HEADER, HostSpec, Settings
from ringserve.errors import LaunchError
from ringserve.ipc.keeper_report import clear_report, read_report
from ringserve.ipc.rank_server import socket_in_use
from ringserve.platform.addresses import local_addresses

log = logging.getLogger(__name__)
READY_POLL_S = 0.25
KEEPER_START_S = 30.0
LOOPBACK = "127.0.0.1"
REMOTE_POLL_S = 2.0


def api_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host
    return f"http://{host}:{settings.api_port}"


@dataclass
class Status:
    """A run as `status` shows it: each process (alive, memory) and the API's readiness."""

    state: RunState
    health: dict
    processes: list[ProcessInfo] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console(stderr=True)
        self.run_dir = settings.run_dir
        self.logs_dir = settings.run_dir / "logs"

    # --- start -------------------------------------------------------------------------------
    def start(self, model_path: str, demo_model: bool) -> RunState:
        """Start every rank and the API. A configured model is checked and fetched on every
        host first (the demo model is built here already)."""
        self._refuse_if_running()
        private_dir(self.logs_dir)  # and the run directory above it
        clear_report(self.run_dir)
        records = self.start_ranks(model_path, prepare=not demo_model)
        run_id = secrets.token_hex(8)
        try:
            records.append(api_record(start_api(self.settings, run_id)))
            if self.settings.keeper:  # it starts up while the ranks load, and waits for them
                records.append(start_keeper(self.settings, run_id))
        except OSError:
            stop_records(records, self.settings)
            raise
        state = RunState(
            run_id=run_id,
            started_at=time.time(),
            model=model_path,
            demo_model=demo_model,
            launcher=self.settings.launcher,
            backend=self.settings.backend,
            api_url=api_url(self.settings),
            processes=tuple(records),
            model_revision=self.settings.model_revision,
            pipeline_split=self.settings.pipeline_split,
        )
        save_state(self.run_dir, state)
        return state

    def start_ranks(
        self, model_path: str, prepare: bool, fresh_logs: bool = True
    ) -> list[ProcessRecord]:
        """Start every rank (on RINGSERVE_HOSTS, or all here). `prepare`: check and fetch the
        model on every host first; `fresh_logs`: start the logs afresh (a restart keeps them)."""
        if self.settings.hosts:
            return self._start_across_hosts(model_path, prepare, fresh_logs)
        if prepare:
            self._pin_revision(prepare_model(self.settings, {}, self.console))
        return self._start_here(model_path, fresh_logs)

    def wait_keeper(self, state: RunState, timeout: float = KEEPER_START_S) -> None:
        """Wait until the keeper has seen the ring serve (see cluster/keeper.py): from then on
        it restarts a ring that breaks, and the API holds requests through a restart."""
        deadline = time.monotonic() + timeout
        for record in state.of_role("keeper"):
            while (
                (report := read_report(self.run_dir)) is None
                or report.pid != record.pid
                or not report.keeping
            ):
                if ownership(record.pid, record.identity) != OURS:
                    self._raise_exited(record)
                if time.monotonic() > deadline:
                    raise LaunchError(f"the keeper did not report within {timeout:.0f} s")
                time.sleep(READY_POLL_S)

    def _pin_revision(self, ready: ModelReady) -> None:
        """The ranks load the commit every host was checked and fetched at (resolving the
        revision again, a host could find a newer one), split as the files each host received
        are for."""
        update: dict[str, object] = {}
        if ready.commit:
            update["model_revision"] = ready.commit
        if ready.split:
            update["pipeline_split"] = ready.split
        self.settings = self.settings.model_copy(update=update)

    def _refuse_if_running(self) -> None:
        existing = load_state(self.run_dir)
        if existing is None:
            self._refuse_what_answers()
            return
        infos = probe(existing.processes, self.settings)
        if any(info.alive for info in infos):
            raise LaunchError(
                f"ringserve is already running (state in {self.run_dir}); "
                "use `launch.py stop` or `launch.py restart`"
            )
        unknown = [info.problem for info in infos if info.alive is None]
        if unknown:
            raise LaunchError(
                f"cannot tell whether the last run stopped ({unknown[0]}); run `launch.py stop` "
                f"again, or remove {self.run_dir / 'state.json'} if that host is gone for good"
            )

    def _refuse_what_answers(self) -> None:
        """With no run recorded, a ring or an API that still answers (its state file removed,
        or another run directory with the same socket or port) must not be taken over."""
        socket_path = self.settings.rank_socket
        if socket_path.exists() and socket_in_use(socket_path):
            raise LaunchError(
                f"a ring is serving on {socket_path}, but {self.run_dir} records no run; stop "
                "it from the run directory that started it (or stop its processes by hand)"
            )
        host = api_url(self.settings).split("//")[1].rsplit(":", 1)[0]
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((host, self.settings.api_port)) == 0:
                raise LaunchError(
                    f"port {self.settings.api_port} on {host} is taken (another ringserve API "
                    "or another program); stop it, or set RINGSERVE_API_PORT"
                )

    def _clear_logs(self) -> None:
        for old in self.logs_dir.glob("*.log"):
            old.unlink()

    def _start_here(self, model_path: str, fresh_logs: bool) -> list[ProcessRecord]:
        """Every rank on this machine, planned like a one-host cluster on 127.0.0.1."""
        this_host = HostSpec(host=LOOPBACK, ips=(LOOPBACK,), ranks=self.settings.local_ranks)
        settings = self.settings.model_copy(update={"hosts": (this_host,)})
        plan = plan_cluster(
            settings.model_copy(update={"launcher": "direct"}),
            {LOOPBACK},
            model_path,
            self.logs_dir,
        )
        if fresh_logs:
            self._clear_logs()
        hosts_json = self.run_dir / "hosts.json"
        write_private(hosts_json, json.dumps(plan.hostfile, indent=2))
        if self.settings.launcher == "mlx":
            env = {"RINGSERVE_MODEL": model_path, "RINGSERVE_RUN_DIR": str(self.run_dir)}
            process = self._start_under_mlx_launch(hosts_json, env)
            return [
                ProcessRecord(
                    role="rank",
                    rank=0,
                    host="localhost",
                    pid=process.pid,
                    log_path=process.log_path,
                    identity=process.identity,
                )
            ]
        started: list[ProcessRecord] = []
        try:
            start_planned_ranks(plan, {}, started)
        except BaseException:
            stop_records(started, self.settings)
            raise
        return started

    def _start_across_hosts(
        self, model_path: str, prepare: bool, fresh_logs: bool
    ) -> list[ProcessRecord]:
        """RINGSERVE_HOSTS: check every remote host, push the project, check and fetch the
        model on every host, start every rank."""
        plan = plan_cluster(self.settings, local_addresses(), model_path, self.logs_dir)
        with checked_hosts(plan.remote_hosts, self.settings, model_path) as hosts:
            if fresh_logs:
                self._clear_logs()
            write_private(self.run_dir / "hosts.json", json.dumps(plan.hostfile, indent=2))
            push_to_hosts(hosts, PROJECT_DIR, show_progress=sys.stdout.isatty())
            if prepare:
                self._pin_revision(prepare_model(self.settings, hosts, self.console))
                plan = plan_cluster(self.settings, local_addresses(), model_path, self.logs_dir)
            started: list[ProcessRecord] = []
            try:
                start_planned_ranks(plan, hosts, started)
            except BaseException:
                stop_records(started, self.settings)
                raise
        return started

    def _start_under_mlx_launch(self, hosts_json: Path, env: dict[str, str]) -> RankProcess:
        """`mlx.launch` runs every rank itself (its I/O loop keeps one core busy meanwhile)."""
        mlx_launch = Path(sys.executable).with_name("mlx.launch")
        argv = [str(mlx_launch), "--hostfile", str(hosts_json), "--backend", self.settings.backend]
        argv += ["--starting-port", str(self.settings.ring_port), "--python", sys.executable]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        argv += ["--", str(PROJECT_DIR / "server.py")]
        return start_detached(
            RankLaunch(
                rank=0,
                host="localhost",
                argv=tuple(argv),
                cwd=str(PROJECT_DIR),
                log_path=str(self.logs_dir / "mlx-launch.log"),
                pid_path=str(self.run_dir / "mlx-launch.pid"),
            )
        )

    def wait_ready(self, state: RunState, timeout: float) -> None:
        """Poll until /health/ready says yes; fail early with the log of a process that died."""
        deadline = time.monotonic() + timeout
        reason = "not answering yet"
        watched = [p for p in state.processes if p.role != "keeper"]
        local = [p for p in watched if p.local]
        remote = [p for p in watched if not p.local]
        next_remote_poll = time.monotonic() + REMOTE_POLL_S
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                dead = [p for p in local if ownership(p.pid, p.identity) != OURS]
                if remote and time.monotonic() >= next_remote_poll:
                    infos = probe(remote, self.settings)
                    dead += [p for p, i in zip(remote, infos, strict=True) if i.alive is False]
                    next_remote_poll = time.monotonic() + REMOTE_POLL_S
                if dead:
                    self._raise_exited(dead[0])
                try:
                    reply = client.get(f"{state.api_url}/health/ready")
                    if reply.headers.get(RUN_HEADER) != state.run_id:
                        reason = "another process answers on the API's port"
                    elif reply.status_code == 200:
                        return
                    reason = reply.json().get("reason") or reason
                except httpx.HTTPError as exc:
                    reason = f"API not answering yet ({type(exc).__name__})"
                time.sleep(READY_POLL_S)
        raise LaunchError(f"not ready after {timeout:.0f} s: {reason}")

    def _raise_exited(self, process: ProcessRecord) -> None:
        try:
            end = log_tail(process, self.settings)
        except LaunchError as exc:
            end = f"(cannot read it: {exc})"
        raise LaunchError(
            f"{process.name} (pid {process.pid} on {process.host}) exited during start; "
            f"the end of {process.log_path}:\n{end}"
        )

    # --- stop --------------------------------------------------------------------------------
    def stop(self) -> StopReport:
        """Stop every process of the run on every host (API first); report what is left.

        The run state keeps what could not be verified stopped, so `stop` can be run again.
        """
        state = load_state(self.run_dir)
        if state is None:
            return StopReport()
        # The keeper first, or it would restart what is being stopped; it stops any rank it
        # was starting, and records any it started, before it exits.
        report = stop_records(state.of_role("keeper"), self.settings)
        state = load_state(self.run_dir) or state
        rest = [p for p in state.processes if p.role != "keeper"]
        later = stop_records(rest, self.settings)
        report.left += later.left
        report.problems += later.problems
        if report.left:
            save_state(self.run_dir, state.model_copy(update={"processes": tuple(report.left)}))
        else:
            clear_state(self.run_dir)
            clear_report(self.run_dir)
            self.settings.rank_socket.unlink(missing_ok=True)
        return report

    # --- status ------------------------------------------------------------------------------
    def status(self, with_processes: bool = True) -> Status | None:
        state = load_state(self.run_dir)
        if state is None:
            return None
        try:
            reply = httpx.get(f"{state.api_url}/health/ready", timeout=5.0)
            health = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            health = {"ready": False, "reason": f"API not answering ({type(exc).__name__})"}
        infos = probe(state.processes, self.settings) if with_processes else []
        return Status(state, health, infos)

    def record(self, which: str) -> ProcessRecord | None:
        """The recorded process `which` names: a rank number or "api"."""
        state = load_state(self.run_dir)
        if state is None:
            return None
        for process in state.processes:
            if (which in ("api", "keeper") and process.role == which) or (
                process.role == "rank" and str(process.rank) == which
            ):
                return process
        return None
