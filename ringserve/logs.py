"""One logging format for every process of the project; a warning or error repeated many times
is written once per few seconds, with a count of the ones held back; and a process the
launcher started detached rotates its own log file by size."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Callable
from logging.handlers import RotatingFileHandler

# The log file the launcher opened as a detached process's stdout and stderr (not
# RINGSERVE_-prefixed: settings refuse unknown RINGSERVE_ variables).
LOG_FILE_VAR = "_RINGSERVE_LOG_FILE"
LOG_MAX_BYTES = 16 * 2**20
LOG_BACKUPS = 3
# A message (by logger, level and text before its arguments) is written once per this long.
REPEAT_WINDOW_S = 10.0
# Messages remembered before the ones not seen for a window are forgotten.
REMEMBERED_MESSAGES = 1024
PRIVATE_FILE = 0o600


class RepeatFilter(logging.Filter):
    """Lets a warning or an error through once per `window` seconds; the first one after says
    how many like it were held back meanwhile (a flood of one error, with its traceback each
    time, would fill the disk and bury everything else). What the process reports as it
    works (info, debug) passes as it is."""

    def __init__(
        self, window: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self.seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # since, held back

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self.clock()
        key = (record.name, record.levelno, str(record.msg))
        since, held = self.seen.get(key, (-self.window, 0))
        if now - since < self.window:
            self.seen[key] = (since, held + 1)
            return False
        if len(self.seen) >= REMEMBERED_MESSAGES:
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.window}
        self.seen[key] = (now, 0)
        if held:
            record.msg = (
                f"{record.getMessage()} ({held} more like this in the {self.window:.0f} s before)"
            )
            record.args = ()
        return True


class PrivateLog(RotatingFileHandler):
    """A log file rotated by size (renamed `.1`, older ones `.2`, ...), each file readable by
    its owner only."""

    def __init__(self, path: str) -> None:
        super().__init__(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        os.fchmod(stream.fileno(), PRIVATE_FILE)
        return stream


class ProcessLog(PrivateLog):
    """The log file the launcher made this process's stdout and stderr: stdout and stderr
    follow it to each new file, so that what else writes there (a traceback at exit, native
    code) stays in the log."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._follow()

    def doRollover(self) -> None:
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        if self.stream is None:
            return
        fd = self.stream.fileno()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)


def _own_log_file() -> str | None:
    """The log file this process writes its stderr to, when the launcher named it."""
    path = os.environ.get(LOG_FILE_VAR)
    if not path:
        return None
    try:
        ours, named = os.fstat(2), os.stat(path)
    except OSError:
        return None
    same = (ours.st_dev, ours.st_ino) == (named.st_dev, named.st_ino)
    return path if same else None  # a launcher between (mlx.launch) reads stderr itself


def setup_logging(level: str, who: str) -> None:
    path = _own_log_file()
    handler = ProcessLog(path) if path else logging.StreamHandler()
    handler.addFilter(RepeatFilter())
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[handler],
        force=True,
    )
