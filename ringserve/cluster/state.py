"""The run directory's record of what `start` launched, read by `stop`, `status` and `logs`."""

from __future__ import annotations

import contextlib
import json
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
        return "the API" if self.role == "api" else f"rank {self.rank}"


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

    @property
    def ranks(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "rank"]


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
