"""The run directory's record of what `start` launched, read by `stop`, `status` and `logs`;
and how the run directory's files are made: readable by their owner only (0600 files in 0700
directories, a directory made before included), since logs carry what requests did."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict

from ringserve.config.settings import HostSpec

# The run the API belongs to: given in its environment (not RINGSERVE_-prefixed: settings
# refuse unknown RINGSERVE_ variables), sent back in a header of its readiness answer.
RUN_ID_VAR = "_RINGSERVE_RUN_ID"


class ProcessRecord(BaseModel):
    """A started process. `remote` is how to reach its host over SSH; None: this machine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    rank: int | None
    host: str
    pid: int
    log_path: str
    remote: HostSpec | None = None
    # When it started and its command line (process_identity): checked before any signal.
    identity: str | None = None

    @property
    def local(self) -> bool:
        return self.remote is None

    @property
    def name(self) -> str:
        if self.role == "keeper":
            return "the keeper"
        return "the API" if self.role == "api" else f"rank {self.rank}"

    @property
    def label(self) -> str:
        """How `status` names it in its table."""
        return self.role if self.role in ("api", "keeper") else f"rank {self.rank}"


class RunState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str = ""  # the API answers with it, so `start` knows its own API from another
    started_at: float
    model: str
    demo_model: bool
    launcher: str
    backend: str
    api_url: str
    processes: tuple[ProcessRecord, ...]
    # The revision the ranks were started at (a hub model's commit, pinned by `start`).
    model_revision: str = ""
    # The pipeline split the hosts' copies of the model are for (pinned by `start`), if any.
    pipeline_split: tuple[int, ...] = ()

    @property
    def ranks(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "rank"]

    def of_role(self, role: str) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == role]


PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """`path` made (with its parents) if missing, and private whatever mode it had."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def _private_fd(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # a file made before keeps its mode otherwise
    return fd


def write_private(path: Path, text: str) -> None:
    """`text` written to `path` whole (a reader never sees half of it), readable by us only."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(_private_fd(tmp, os.O_TRUNC), "w") as handle:
        handle.write(text)
    tmp.replace(path)


def open_private(path: Path) -> BinaryIO:
    """A file opened for appending (a log, a lock), in a private directory, readable by us
    only."""
    private_dir(path.parent)
    return os.fdopen(_private_fd(path, os.O_APPEND), "ab")


def state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def save_state(run_dir: Path, state: RunState) -> None:
    write_private(state_path(run_dir), state.model_dump_json(indent=2))


def load_state(run_dir: Path) -> RunState | None:
    path = state_path(run_dir)
    if not path.is_file():
        return None
    return RunState.model_validate(json.loads(path.read_text()))


def clear_state(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(run_dir).unlink()


@contextlib.contextmanager
def _state_lock(run_dir: Path) -> Iterator[None]:
    with (run_dir / "state.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def update_state(run_dir: Path, change: Callable[[RunState], RunState]) -> RunState | None:
    """Change the recorded run, one writer at a time (the keeper and a person's `launch.py`
    may both replace processes); None when no run is recorded."""
    with _state_lock(run_dir):
        state = load_state(run_dir)
        if state is None:
            return None
        changed = change(state)
        save_state(run_dir, changed)
        return changed


def replace_role(state: RunState, role: str, records: list[ProcessRecord]) -> RunState:
    """`state` with the processes of `role` replaced by `records`."""
    others = tuple(p for p in state.processes if p.role != role)
    return state.model_copy(update={"processes": (*others, *records)})
