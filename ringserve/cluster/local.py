"""Processes on this machine: start detached in their own process group, check, read logs.
(Stopping goes through `process_identity`, the same code remote hosts run.)"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from ringserve.cluster.process_identity import group_members, new_process_identity
from ringserve.cluster.spec import RankLaunch, RankProcess
from ringserve.cluster.state import open_private, write_private
from ringserve.logs import LOG_FILE_VAR


def start_detached(launch: RankLaunch) -> RankProcess:
    """Start `launch` in a new session (it leads its own process group) and record its PID.
    Its output goes to its log, which the process rotates itself (`logs.py`)."""
    with open_private(Path(launch.log_path)) as log:
        process = subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env={**os.environ, **launch.env, LOG_FILE_VAR: launch.log_path},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if launch.pid_path:
        write_private(Path(launch.pid_path), f"{process.pid}\n")
    identity = new_process_identity(process.pid)
    return RankProcess(
        launch.rank, launch.host, process.pid, launch.log_path, launch.pid_path, identity
    )


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process on this machine, or None when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    if Path("/proc/self").is_dir():
        return None
    ps = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(ps.stdout.split()[0]) * 1024 if ps.stdout.split() else None


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
