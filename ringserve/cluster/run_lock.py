"""One launch.py at a time may start or stop a run: a lock file in the run directory."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from ringserve.cluster.state import open_private
from ringserve.errors import LaunchError

LOCK_NAME = "launch.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Held while a command changes what runs; a second one is refused, not queued (the
    kernel drops the lock with the process, so a killed launch.py leaves none behind)."""
    with open_private(run_dir / LOCK_NAME) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LaunchError(
                f"another launch.py is starting or stopping the run in {run_dir}; "
                "wait for it to finish"
            ) from None
        yield
