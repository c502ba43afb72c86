"""What the keeper (the process `launch.py start` leaves to restart a ring that lost a rank)
tells the API, and what a rank that leaves the ring tells the keeper.

The keeper writes its report to the run directory at every look it takes; the API reads it to
know whether a ring that is not serving will come back (it then holds requests rather than
refusing them) and to show the restarts. A rank that gives the ring up says why in its log, on
a line the keeper looks for: a rank whose log does not say so died (killed, crashed).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from ringserve.logs import PRIVATE_FILE

REPORT_NAME = "keeper.json"
# A report older than this is from a keeper that is gone: nobody will restart the ring.
STALE_AFTER_S = 10.0
# How often the keeper looks (and writes its report).
KEEPER_POLL_S = 0.5
LEFT_RING = "left the ring"
CANNOT_SERVE = "cannot serve"


class KeeperReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    looked_at: float  # time.time() of the keeper's last look
    keeping: bool = False  # it has seen the ring serve: from then on it restarts it
    restarting: bool = False  # a restart is under way: requests are held meanwhile
    restarts: int = 0
    last_cause: str | None = None  # what happened, in general words (open to anyone)
    last_reason: str | None = None  # what happened, with ranks, PIDs and hosts
    last_at: float | None = None  # time.time() of the last restart's start
    left_out: tuple[str, ...] = ()  # hosts that kept failing, served without
    gave_up: str | None = None  # why the keeper cannot go on (it stopped)

    def watching(self, now: float | None = None) -> bool:
        """Whether a keeper is there to bring a ring that is not serving back."""
        fresh = (now if now is not None else time.time()) - self.looked_at < STALE_AFTER_S
        return fresh and self.gave_up is None


def write_report(run_dir: Path, report: KeeperReport) -> None:
    path = run_dir / REPORT_NAME
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "w") as handle:
        handle.write(report.model_dump_json())
    tmp.replace(path)


def read_report(run_dir: Path) -> KeeperReport | None:
    """The keeper's last report; None when there is none (no keeper was started)."""
    try:
        return KeeperReport.model_validate(json.loads((run_dir / REPORT_NAME).read_text()))
    except (OSError, ValueError, ValidationError):
        return None


def clear_report(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / REPORT_NAME).unlink()


def left_ring_line(pid: int, reason: str) -> str:
    """What a rank that gives the ring up logs last."""
    return f"{LEFT_RING} (pid {pid}): {reason}"


def cannot_serve_line(pid: int, reason: str) -> str:
    """What a rank that stops on an error of its own (the model does not fit, say) logs last:
    a restart would meet it again."""
    return f"{CANNOT_SERVE} (pid {pid}): {reason}"


def _said(log_text: str, marker: str) -> str | None:
    for line in reversed(log_text.splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def left_ring_reason(log_text: str, pid: int) -> str | None:
    """Why the rank with `pid` gave the ring up, from its log; None: it did not say (it died)."""
    return _said(log_text, f"{LEFT_RING} (pid {pid}): ")


def cannot_serve_reason(log_text: str, pid: int) -> str | None:
    """The error the rank with `pid` stopped on, from its log; None: it did not stop on one."""
    return _said(log_text, f"{CANNOT_SERVE} (pid {pid}): ")
