"""The API process: started beside rank 0, and restartable alone since it holds no model."""

from __future__ import annotations

import sys

from ringserve.cluster.local import start_detached
from ringserve.cluster.process_identity import stop_groups
from ringserve.cluster.spec import RankLaunch, RankProcess
from ringserve.cluster.state import (
    RUN_ID_VAR,
    ProcessRecord,
    load_state,
    replace_role,
    update_state,
)
from ringserve.config.settings import PROJECT_DIR, Settings
from ringserve.errors import LaunchError

API_GRACE_S = 10.0


def start_api(settings: Settings, run_id: str) -> RankProcess:
    return start_detached(
        RankLaunch(
            rank=-1,
            host="localhost",
            argv=(sys.executable, str(PROJECT_DIR / "api.py")),
            cwd=str(PROJECT_DIR),
            env={"RINGSERVE_RUN_DIR": str(settings.run_dir), RUN_ID_VAR: run_id},
            log_path=str(settings.run_dir / "logs" / "api.log"),
            pid_path=str(settings.run_dir / "api.pid"),
        )
    )


def api_record(api: RankProcess) -> ProcessRecord:
    return ProcessRecord(
        role="api",
        rank=None,
        host=api.host,
        pid=api.pid,
        log_path=api.log_path,
        identity=api.identity,
    )


def restart_api(settings: Settings) -> ProcessRecord:
    """Replace the API process of the running ring; the ranks and their model stay as they are."""
    state = load_state(settings.run_dir)
    if state is None:
        raise LaunchError(f"nothing is running (no run state in {settings.run_dir})")
    old = [p for p in state.processes if p.role == "api"]
    outcome = stop_groups({p.pid: p.identity for p in old}, API_GRACE_S)
    left = [pid for pid, result in outcome.items() if result.startswith("left")]
    if left:
        raise LaunchError(f"the old API process {left} would not stop")
    record = api_record(start_api(settings, state.run_id))
    update_state(settings.run_dir, lambda now: replace_role(now, "api", [record]))
    return record
