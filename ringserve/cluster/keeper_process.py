"""The keeper's process: started by `launch.py start` once the ring serves, beside the API."""

from __future__ import annotations

import sys

from ringserve.cluster.local import start_detached
from ringserve.cluster.spec import RankLaunch
from ringserve.cluster.state import RUN_ID_VAR, ProcessRecord
from ringserve.config.settings import PROJECT_DIR, Settings


def start_keeper(settings: Settings, run_id: str) -> ProcessRecord:
    process = start_detached(
        RankLaunch(
            rank=-1,
            host="localhost",
            argv=(sys.executable, str(PROJECT_DIR / "launch.py"), "keep"),
            cwd=str(PROJECT_DIR),
            env={"RINGSERVE_RUN_DIR": str(settings.run_dir), RUN_ID_VAR: run_id},
            log_path=str(settings.run_dir / "logs" / "keeper.log"),
            pid_path=str(settings.run_dir / "keeper.pid"),
        )
    )
    return ProcessRecord(
        role="keeper",
        rank=None,
        host=process.host,
        pid=process.pid,
        log_path=process.log_path,
        identity=process.identity,
    )
