"""Our processes, told apart from whatever later got their PIDs, and stopped by process group.

A started process is recorded with its identity (when it started, and its command line); no
signal goes to a PID whose process no longer has that identity. A group whose leader is gone
but whose members live is still ours: the kernel gives no new process the number of a process
group that exists.

Standard library only, and nothing else of the project: the remote scripts carry this file's
source, so a remote host runs the very same checks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping

OURS, FOREIGN, GONE = "ours", "foreign", "gone"


def process_identity(pid: int) -> str | None:
    """ "<start>|<command line>" of a running process; None when there is none (or a zombie).

    Linux: the boot's id and the start time in clock ticks since boot (so a PID reused after
    a reboot differs too); elsewhere (macOS), `ps`'s start time."""
    if pid <= 0:
        return None
    if not os.path.isdir("/proc/self"):
        return _identity_from_ps(pid)
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return f"{boot}:{fields[19]}|{command}"


def _identity_from_ps(pid: int) -> str | None:
    ps = subprocess.run(
        ["ps", "-o", "stat=,lstart=,command=", "-p", str(pid)], capture_output=True, text=True
    )
    words = ps.stdout.split()
    if ps.returncode != 0 or len(words) < 6 or words[0].startswith("Z"):
        return None
    # lstart is five words: "Wed Dec  2 03:50:22 2026".
    return f"{' '.join(words[1:6])}|{' '.join(words[6:])}"


def new_process_identity(pid: int, within: float = 2.0) -> str | None:
    """The identity of a process just started. Its parent may learn that the exec succeeded
    a moment before the kernel has set the new command line, which reads empty until then."""
    deadline = time.monotonic() + within
    identity = process_identity(pid)
    while identity is not None and identity.endswith("|") and time.monotonic() < deadline:
        time.sleep(0.005)
        identity = process_identity(pid)
    return identity


def same_process(current: str, recorded: str) -> bool:
    """The same start, and the same command line (unless the process is exiting: its command
    line reads empty then)."""
    start, _, command = current.partition("|")
    recorded_start, _, recorded_command = recorded.partition("|")
    return start == recorded_start and command in ("", recorded_command)


def group_members(pgid: int) -> list[int]:
    """The living (not zombie) processes of a process group."""
    if not os.path.isdir("/proc/self"):
        ps = subprocess.run(["ps", "-A", "-o", "pid=,pgid=,stat="], capture_output=True, text=True)
        rows = [line.split() for line in ps.stdout.splitlines()]
        return [int(r[0]) for r in rows if len(r) >= 3 and int(r[1]) == pgid and r[2][0] != "Z"]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def ownership(pgid: int, identity: str | None) -> str:
    """OURS, FOREIGN (the leader's PID now belongs to another process, or the record has no
    identity to check it by: never signal it) or GONE."""
    current = process_identity(pgid)
    if current is not None:
        return OURS if identity is not None and same_process(current, identity) else FOREIGN
    return OURS if group_members(pgid) else GONE


def stop_groups(groups: Mapping[int, str | None], grace: float) -> dict[int, str]:
    """SIGTERM each group that is ours, SIGKILL what is left after `grace` seconds. For each
    group: "gone", "foreign", "terminated", "killed", or "left <pids>" if SIGKILL failed."""
    outcome: dict[int, str] = {}
    stopping = []
    for pgid, identity in groups.items():
        found = ownership(pgid, identity) if pgid > 1 else FOREIGN
        if found == OURS:
            _signal(pgid, signal.SIGTERM)
            stopping.append(pgid)
        else:
            outcome[pgid] = found
    left = _wait_gone(stopping, grace)
    outcome.update({pgid: "terminated" for pgid in stopping if pgid not in left})
    for pgid in left:
        _signal(pgid, signal.SIGKILL)
    survivors = _wait_gone(left, 5.0)
    outcome.update({pgid: "killed" for pgid in left if pgid not in survivors})
    for pgid in survivors:
        outcome[pgid] = "left " + " ".join(map(str, group_members(pgid)))
    return outcome


def _signal(pgid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, number)


def _wait_gone(pgids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    left = [p for p in pgids if group_members(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if group_members(p)]
    return left
