"""What it takes to start one rank, independent of where it runs (locally or over SSH)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankLaunch:
    """One rank process: argv run in `cwd` with `env` added, output to `log_path`."""

    rank: int
    host: str
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    pid_path: str = ""


@dataclass(frozen=True)
class RankProcess:
    """A started rank: where it runs and the PID (also its process-group id, it leads one),
    with the identity that tells it from a later process with the same PID."""

    rank: int
    host: str
    pid: int
    log_path: str
    pid_path: str
    identity: str | None = None
