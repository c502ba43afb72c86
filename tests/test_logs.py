"""Logs and the run directory's files: a repeated warning held back, a detached process's log
rotated (in a real child process, its stderr the log as the launcher opens it), and files and
directories made private whatever mode they had."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

from ringserve.cluster.state import open_private, private_dir, write_private
from ringserve.logs import LOG_BACKUPS, LOG_FILE_VAR, RepeatFilter

PROJECT_DIR = Path(__file__).resolve().parents[1]


def record(level: int, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("asyncio", level, __file__, 1, message, args, None)


def test_a_repeated_warning_is_written_once_per_window_with_a_count() -> None:
    now = [0.0]
    repeats = RepeatFilter(window=10, clock=lambda: now[0])
    passed = []
    for second in range(25):
        now[0] = float(second)
        for _ in range(100):
            accept = record(logging.ERROR, "socket.accept() out of system resource (%s)", second)
            if repeats.filter(accept):
                passed.append(accept.getMessage())
    assert passed == [
        "socket.accept() out of system resource (0)",
        "socket.accept() out of system resource (10) (999 more like this in the 10 s before)",
        "socket.accept() out of system resource (20) (999 more like this in the 10 s before)",
    ]


def test_what_a_process_reports_as_it_works_is_never_held_back() -> None:
    repeats = RepeatFilter(window=10, clock=lambda: 0.0)
    assert all(repeats.filter(record(logging.INFO, "request %d done", i)) for i in range(50))
    assert repeats.filter(record(logging.WARNING, "another warning"))


CHILD = """
import logging, sys
import ringserve.logs as logs
logs.LOG_MAX_BYTES = 4000
logs.setup_logging("INFO", "child")
for i in range(200):
    logging.getLogger("child").info("line %d of the child's log", i)
print("printed after the last rotation", file=sys.stderr, flush=True)
"""


def test_a_detached_process_rotates_its_own_log_and_its_stderr_follows(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "api.log"
    with open_private(log) as output:  # as the launcher starts a process
        subprocess.run(
            [sys.executable, "-c", CHILD],
            cwd=PROJECT_DIR,
            env={**os.environ, LOG_FILE_VAR: str(log)},
            stdout=output,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=60,
        )
    files = sorted(log.parent.iterdir())
    assert [f.name for f in files] == ["api.log"] + [f"api.log.{i}" for i in range(1, 4)]
    assert len(files) == 1 + LOG_BACKUPS
    assert all(f.stat().st_size <= 4000 for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    text = log.read_text()
    assert "line 199 of the child's log" in text
    assert text.rstrip().endswith("printed after the last rotation")


def test_a_process_whose_stderr_is_not_its_log_does_not_rotate_it(tmp_path: Path) -> None:
    named = tmp_path / "other.log"
    named.write_text("")
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=PROJECT_DIR,
        env={**os.environ, LOG_FILE_VAR: str(named)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "line 199 of the child's log" in result.stderr
    assert named.read_text() == "" and not (tmp_path / "other.log.1").exists()


def test_run_files_are_private_whatever_mode_they_had(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    (run / "state.json").write_text("{}")
    (run / "state.json").chmod(0o644)
    (run / "api.log").write_text("old\n")
    (run / "api.log").chmod(0o644)
    private_dir(run / "logs")
    write_private(run / "state.json", '{"new": true}')
    with open_private(run / "api.log") as log:
        log.write(b"new\n")
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE((run / "logs").stat().st_mode) == 0o700
    for name in ("state.json", "api.log"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o600
    assert (run / "api.log").read_text() == "old\nnew\n"
    assert not list(run.glob("*.tmp"))
