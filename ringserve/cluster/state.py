"""The run directory's record of what `start` launched, read by `stop`, `status` and `logs`."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ringserve.config.settings import HostSpec

# The run the API belongs to: given in its environment (not RINGSERVE_-prefixed: settings
# refuse unknown RINGSERVE_ variables), sent back in a header of its readiness answer.
RUN_ID_VAR = "_RINGSERVE_RUN_ID"
RUN_HEADER = "x-ringserve-run"


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

    @property
    def ranks(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "rank"]

    def of_role(self, role: str) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == role]


def state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def save_state(run_dir: Path, state: RunState) -> None:
    path = state_path(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(path)


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
