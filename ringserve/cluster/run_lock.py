"""One launch.py at a time may start or stop a run: a lock file in the run directory."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from ringserve.cluster.state import open_private
from ringserve.errors import LaunchError

LOCK_NAME = "launch.lock"
# A hold this short (the keeper starting the API again, say) is waited out, not refused.
BRIEF_HOLD_S = 3.0
POLL_S = 0.05


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: float = BRIEF_HOLD_S) -> Iterator[None]:
    """Held while a command changes what runs; a second one is refused once `wait` has passed,
    not queued (the kernel drops the lock with the process, so a killed launch.py leaves none
    behind)."""
    with open_private(run_dir / LOCK_NAME) as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LaunchError(
                        f"another launch.py is starting or stopping the run in {run_dir} (or the "
                        "keeper is starting the API again); wait for it to finish"
                    ) from None
                time.sleep(POLL_S)
        yield
