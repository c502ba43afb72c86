"""What `start` asks each host about the model over its SSH session (`launch.py prepare-model`
there: check it, fetch it, settle copied files), how the answers read, and the progress bars
the user watches meanwhile."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ringserve.cluster.hosts import host_workdir
from ringserve.cluster.remote import RemoteHost
from ringserve.config.settings import HostSpec, Settings, settings_env
from ringserve.errors import (
    MemoryCheckError,
    ModelError,
    ModelUnavailableError,
    RemoteHostError,
    RingserveError,
)
from ringserve.model.prepare import (
    Failure,
    Prepared,
    PrepareRequest,
    ProgressLine,
    Settled,
    fetch_here,
    parse_line,
    tensor_expected,
)
from ringserve.model.source import looks_like_hub_id
from ringserve.model.store import CachedFile
from ringserve.telemetry.memory import DEFAULT_MARGIN, human_bytes

log = logging.getLogger(__name__)
# Forwarded to the other hosts' `prepare-model` (never to their ranks, which load offline).
FORWARDED = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")
FETCH_TIMEOUT_S = 24 * 3600.0
CHECK_TIMEOUT_S = 600.0

OnProgress = Callable[[int, int], None]


def request_for(
    spec: HostSpec,
    label: str,
    settings: Settings,
    phase: str,
    environ: Mapping[str, str],
    **extra: object,
) -> PrepareRequest:
    """What a host's `prepare-model` is sent: the settings its ranks get (no API key), this
    launcher's hub variables where the host asks the hub itself, and the host's own cache."""
    # A directory needs none, nor a host that receives the model (HF_TOKEN stays here).
    asks_hub = looks_like_hub_id(settings.model) and not extra.get("receives")
    forwarded = FORWARDED if asks_hub and phase != "settle" else ()
    environment = {k: environ[k] for k in forwarded if environ.get(k)}
    given = settings_env(settings)
    given.pop("RINGSERVE_API_KEY", None)  # only the API needs it; keep it off other hosts
    if spec.hf_home:
        environment["HF_HOME"] = spec.hf_home
    return PrepareRequest.model_validate(
        {"phase": phase, "host": label, "settings": given, "environment": environment, **extra}
    )


def run_there(
    host: RemoteHost,
    settings: Settings,
    phase: str,
    on_progress: OnProgress | None = None,
    **extra: object,
) -> Prepared | Settled:
    """Run `launch.py prepare-model` on a host (its pushed project), relaying its progress."""
    request = request_for(host.spec, host.session.label, settings, phase, os.environ, **extra)
    found: list[Prepared | Settled | Failure] = []

    def on_line(line: str) -> None:
        parsed = parse_line(line)
        if isinstance(parsed, ProgressLine):
            if on_progress is not None:
                on_progress(parsed.done, parsed.total)
        elif parsed is not None:
            found.append(parsed)

    launch_py = f"{host_workdir(host.spec, settings).rstrip('/')}/launch.py"
    result = host.session.run(
        [host.python, launch_py, "prepare-model"],
        timeout=FETCH_TIMEOUT_S if phase == "fetch" else CHECK_TIMEOUT_S,
        stdin=request.model_dump_json().encode(),
        on_line=on_line,
    )
    last = found[-1] if found else None
    if isinstance(last, Failure):
        raise error_for(last.exit_code)(last.message)
    if last is not None:
        return last
    reason = (result.err.strip().splitlines() or [f"exit status {result.rc}"])[-1]
    raise RemoteHostError(f"{host.session.label}: preparing the model failed ({reason})")


def prepare_there(
    host: RemoteHost,
    settings: Settings,
    phase: str,
    on_progress: OnProgress | None = None,
    **extra: object,
) -> Prepared:
    """Check the model on a host, or fetch it there from the hub."""
    found = run_there(host, settings, phase, on_progress, **extra)
    if not isinstance(found, Prepared):
        raise RemoteHostError(f"{host.session.label}: `prepare-model {phase}` answered {found}")
    return found


def settle_there(
    host: RemoteHost, settings: Settings, revision: str, wanted: Mapping[str, CachedFile]
) -> Settled:
    """Check the files copied to a host and put them in place there (`store.settle`)."""
    found = run_there(host, settings, "settle", wanted=dict(wanted), revision=revision)
    if not isinstance(found, Settled):
        raise RemoteHostError(f"{host.session.label}: `prepare-model settle` answered {found}")
    return found


def error_for(exit_code: int) -> type[RingserveError]:
    """The error class a host's failure came as (its exit code says which)."""
    kinds: tuple[type[RingserveError], ...] = (
        ModelUnavailableError,
        ModelError,
        MemoryCheckError,
        RemoteHostError,
    )
    return next((kind for kind in kinds if kind.exit_code == exit_code), RingserveError)


def raise_all(failures: list[RingserveError]) -> None:
    """One line per failing host, raised as the first failure's kind (its exit code)."""
    if not failures:
        return
    if len(failures) == 1:
        raise failures[0]
    lines = "\n".join(str(f) for f in failures)
    raise type(failures[0])(lines)


def check_all(
    checks: Mapping[str, Callable[[], Prepared]], model: str, console: Console
) -> dict[str, Prepared]:
    """Run every host's check; one line per host that failed."""
    checked: dict[str, Prepared] = {}
    failures: list[RingserveError] = []
    with console.status(f"checking {model} on {len(checks)} host(s)…"):
        for label, check in checks.items():
            try:
                checked[label] = check()
            except RingserveError as exc:
                failures.append(exc)
            except Exception as exc:  # a library surprise: one line here, the log keeps it
                log.debug("checking on %s failed", label, exc_info=True)
                failures.append(ModelUnavailableError(f"model {model} on {label}: {exc}"))
    raise_all(failures)
    return checked


class Bar:
    """One host's progress bar: bytes done of bytes to move (which may grow)."""

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=None)
        self.total = 0

    def grow(self, more: int) -> None:
        self.total += more
        self.progress.update(self.task, total=max(self.total, 1))

    def advance(self, done: int) -> None:
        self.progress.advance(self.task, done)

    def show(self, done: int, total: int) -> None:
        self.total = max(total, 1)
        self.progress.update(self.task, completed=done, total=self.total)

    def finish(self) -> None:
        self.progress.update(self.task, completed=self.total or 1, total=self.total or 1)


@contextmanager
def transfers(console: Console) -> Iterator[Callable[[str], Bar]]:
    """A progress display with one bar per host (downloads and copies alike)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield lambda description: Bar(progress, description)


def describe(prepared: Prepared, name: str) -> str:
    revision = f", revision {prepared.commit[:12]}" if prepared.commit else ""
    what = f"{human_bytes(prepared.weight_bytes)} of weights{revision}"
    if prepared.source == "directory":
        return f"model {name}: found on {prepared.host} ({what})"
    return f"model {name}: cached on {prepared.host} ({what})"


def download_here(settings: Settings, checked: Prepared, bar: Bar) -> Prepared:
    """Download on this host what its check found missing, its progress on `bar`."""
    bar.grow(checked.missing_bytes)
    fetched = fetch_here(settings, checked, bar.show)
    bar.finish()
    return fetched


def downloaded(prepared: Prepared, name: str, missing_bytes: int, missing_files: int) -> str:
    return (
        f"model {name}: downloaded {human_bytes(missing_bytes)} of weights ({missing_files} "
        f"file(s)) to {prepared.host} in {prepared.seconds:.1f} s"
    )


def check_ring_holds(settings: Settings, checked: Mapping[str, Prepared], here: str) -> None:
    """Where the ranks will settle a pipeline's split themselves (from every rank's budget,
    once they have joined), what can be told before any weight is downloaded is whether the
    ring holds the model at all: refused then, one line per host."""
    if tensor_expected(settings, Path(checked[here].path)):
        return  # each host checked its even share already
    weights = max(prepared.weight_bytes for prepared in checked.values())
    need = math.ceil(weights * (1 + DEFAULT_MARGIN))
    room = sum(prepared.weight_room for prepared in checked.values())
    if need <= room:
        return
    hosts = "; ".join(
        f"{label}: {human_bytes(prepared.weight_room)}" for label, prepared in checked.items()
    )
    raise MemoryCheckError(
        f"model {settings.model} needs {human_bytes(need)} ({human_bytes(weights)} of weights "
        f"plus {DEFAULT_MARGIN:.0%} headroom), but the ring's hosts hold "
        f"{human_bytes(room)} together ({hosts}); free memory, add hosts, or choose a "
        "smaller model"
    )
