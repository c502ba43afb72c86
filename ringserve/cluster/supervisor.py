"""The controller behind `launch.py`: start, stop and report every process of a run."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ringserve.cluster.api_process import api_record, start_api
from ringserve.cluster.local import pid_alive, start_detached, stop_groups, tail
from ringserve.cluster.spec import RankLaunch, RankProcess
from ringserve.cluster.state import ProcessRecord, RunState, clear_state, load_state, save_state
from ringserve.config.settings import PROJECT_DIR, Settings
from ringserve.errors import LaunchError

log = logging.getLogger(__name__)
READY_POLL_S = 0.25


@dataclass(frozen=True)
class Placement:
    rank: int
    host: str
    ip: str


def local_placements(settings: Settings) -> list[Placement]:
    return [Placement(rank, "localhost", "127.0.0.1") for rank in range(settings.local_ranks)]


def ring_hostfile(placements: list[Placement], base_port: int) -> list[list[str]]:
    """MLX_HOSTFILE for the ring backend: one "ip:port" list per rank, a port per rank."""
    return [[f"{p.ip}:{base_port + p.rank}"] for p in placements]


def mlx_launch_hostfile(placements: list[Placement], backend: str) -> dict:
    """hosts.json in the format `mlx.launch --hostfile` reads."""
    hosts = [{"ssh": p.host, "ips": [p.ip], "rdma": []} for p in placements]
    return {"backend": backend, "envs": [], "hosts": hosts}


def api_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host
    return f"http://{host}:{settings.api_port}"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.logs_dir = settings.run_dir / "logs"

    # --- start -------------------------------------------------------------------------------
    def start(self, model_path: str, demo_model: bool) -> RunState:
        existing = load_state(self.run_dir)
        if existing is not None and any(pid_alive(p.pid) for p in existing.processes):
            raise LaunchError(
                f"ringserve is already running (state in {self.run_dir}); "
                "use `launch.py stop` or `launch.py restart`"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for old in self.logs_dir.glob("*.log"):
            old.unlink()
        placements = local_placements(self.settings)
        hosts_json = self.run_dir / "hosts.json"
        hosts_json.write_text(
            json.dumps(mlx_launch_hostfile(placements, self.settings.backend), indent=2)
        )
        env = {"RINGSERVE_MODEL": model_path, "RINGSERVE_RUN_DIR": str(self.run_dir)}
        if self.settings.launcher == "mlx":
            ranks = [self._start_under_mlx_launch(hosts_json, env)]
        else:
            ranks = self._start_ranks(placements, env)
        api = start_api(self.settings)
        records = [
            ProcessRecord(role="rank", rank=r.rank, host=r.host, pid=r.pid, log_path=r.log_path)
            for r in ranks
        ]
        records.append(api_record(api))
        state = RunState(
            started_at=time.time(),
            model=model_path,
            demo_model=demo_model,
            launcher=self.settings.launcher,
            backend=self.settings.backend,
            api_url=api_url(self.settings),
            processes=tuple(records),
        )
        save_state(self.run_dir, state)
        return state

    def _start_ranks(self, placements: list[Placement], env: dict[str, str]) -> list[RankProcess]:
        ring_file = self.run_dir / "ring_hostfile.json"
        ring_file.write_text(json.dumps(ring_hostfile(placements, self.settings.ring_port)))
        started = []
        for placement in placements:
            rank_env = {**env, "MLX_RANK": str(placement.rank)}
            if len(placements) > 1:
                rank_env["MLX_HOSTFILE"] = str(ring_file)
            started.append(
                start_detached(
                    RankLaunch(
                        rank=placement.rank,
                        host=placement.host,
                        argv=(sys.executable, str(PROJECT_DIR / "server.py")),
                        cwd=str(PROJECT_DIR),
                        env=rank_env,
                        log_path=str(self.logs_dir / f"rank{placement.rank}.log"),
                        pid_path=str(self.run_dir / f"rank{placement.rank}.pid"),
                    )
                )
            )
        return started

    def _start_under_mlx_launch(self, hosts_json: Path, env: dict[str, str]) -> RankProcess:
        """`mlx.launch` runs every rank itself (its I/O loop keeps one core busy meanwhile)."""
        mlx_launch = Path(sys.executable).with_name("mlx.launch")
        argv = [str(mlx_launch), "--hostfile", str(hosts_json), "--backend", self.settings.backend]
        argv += ["--starting-port", str(self.settings.ring_port)]
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
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                for process in state.processes:
                    if not pid_alive(process.pid):
                        name = "the API" if process.role == "api" else f"rank {process.rank}"
                        raise LaunchError(
                            f"{name} (pid {process.pid}) exited during start; the end of "
                            f"{process.log_path}:\n{tail(Path(process.log_path))}"
                        )
                try:
                    reply = client.get(f"{state.api_url}/health/ready")
                    if reply.status_code == 200:
                        return
                    reason = reply.json().get("reason") or reason
                except httpx.HTTPError as exc:
                    reason = f"API not answering yet ({type(exc).__name__})"
                time.sleep(READY_POLL_S)
        raise LaunchError(f"not ready after {timeout:.0f} s: {reason}")

    # --- stop --------------------------------------------------------------------------------
    def stop(self) -> list[ProcessRecord]:
        """Stop every process of the run (API first); return those that would not die."""
        state = load_state(self.run_dir)
        if state is None:
            return []
        api = [p.pid for p in state.processes if p.role == "api"]
        ranks = [p.pid for p in state.processes if p.role != "api"]
        survivors = set(stop_groups(api)) | set(stop_groups(ranks))
        left = [p for p in state.processes if p.pid in survivors]
        if not left:
            clear_state(self.run_dir)
            self.settings.rank_socket.unlink(missing_ok=True)
        return left

    # --- status ------------------------------------------------------------------------------
    def status(self) -> tuple[RunState | None, dict | None]:
        state = load_state(self.run_dir)
        if state is None:
            return None, None
        try:
            reply = httpx.get(f"{state.api_url}/health/ready", timeout=5.0)
            health = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            health = {"ready": False, "reason": f"API not answering ({type(exc).__name__})"}
        return state, health
