"""The configured model on every host before any rank starts: checked everywhere first (no
weight downloaded until every host passed), then fetched where it is missing, each host on its
own side with its progress shown here."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Mapping
from functools import partial
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
    check_here,
    fetch_here,
    parse_line,
    tensor_expected,
)
from ringserve.model.source import looks_like_hub_id
from ringserve.telemetry.memory import DEFAULT_MARGIN, human_bytes

log = logging.getLogger(__name__)
# Forwarded to the other hosts' `prepare-model` (never to their ranks, which load offline).
FORWARDED = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")
FETCH_TIMEOUT_S = 24 * 3600.0

OnProgress = Callable[[int, int], None]


def local_host_name() -> str:
    return socket.gethostname()


def request_for(
    spec: HostSpec, label: str, settings: Settings, phase: str, environ: Mapping[str, str]
) -> PrepareRequest:
    """What a host's `prepare-model` is sent: the settings its ranks get (no API key), the
    hub variables of this launcher and the host's own cache."""
    # A hub model's variables; a directory needs none (and HF_TOKEN stays on this machine).
    forwarded = FORWARDED if looks_like_hub_id(settings.model) else ()
    environment = {k: environ[k] for k in forwarded if environ.get(k)}
    given = settings_env(settings)
    given.pop("RINGSERVE_API_KEY", None)  # only the API needs it; keep it off other hosts
    if spec.hf_home:
        environment["HF_HOME"] = spec.hf_home
    return PrepareRequest.model_validate(
        {
            "phase": phase,
            "host": label,
            "settings": given,
            "environment": environment,
        }
    )


def prepare_there(
    host: RemoteHost, settings: Settings, phase: str, on_progress: OnProgress | None = None
) -> Prepared:
    """Run `launch.py prepare-model` on a host (its pushed project), relaying its progress."""
    request = request_for(host.spec, host.session.label, settings, phase, os.environ)
    found: list[Prepared | Failure] = []

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
        timeout=FETCH_TIMEOUT_S if phase == "fetch" else 600.0,
        stdin=request.model_dump_json().encode(),
        on_line=on_line,
    )
    if found and isinstance(found[-1], Prepared):
        return found[-1]
    if found and isinstance(found[-1], Failure):
        error = _error_for(found[-1].exit_code)
        raise error(found[-1].message)
    reason = (result.err.strip().splitlines() or [f"exit status {result.rc}"])[-1]
    raise RemoteHostError(f"{host.session.label}: preparing the model failed ({reason})")


def _error_for(exit_code: int) -> type[RingserveError]:
    """The error class a host's failure came as (its exit code says which)."""
    kinds: tuple[type[RingserveError], ...] = (
        ModelUnavailableError,
        ModelError,
        MemoryCheckError,
        RemoteHostError,
    )
    return next((kind for kind in kinds if kind.exit_code == exit_code), RingserveError)


def _raise_all(failures: list[RingserveError]) -> None:
    """One line per failing host, raised as the first failure's kind (its exit code)."""
    if not failures:
        return
    if len(failures) == 1:
        raise failures[0]
    lines = "\n".join(str(f) for f in failures)
    raise type(failures[0])(lines)


def describe(prepared: Prepared, name: str) -> str:
    revision = f", revision {prepared.commit[:12]}" if prepared.commit else ""
    what = f"{human_bytes(prepared.weight_bytes)} of weights{revision}"
    if prepared.source == "directory":
        return f"model {name}: found on {prepared.host} ({what})"
    return f"model {name}: cached on {prepared.host} ({what})"


def check_same_revision(settings: Settings, checked: Mapping[str, Prepared]) -> None:
    """Every host must serve the same commit of a hub model (a host that cannot reach the hub
    uses what its cache holds): ranks loading different weights would answer nonsense, or a
    pipeline's ranks would split different layers."""
    commits = {label: prepared.commit for label, prepared in checked.items() if prepared.commit}
    if len(set(commits.values())) > 1:
        each = "; ".join(f"{label}: {commit[:12]}" for label, commit in commits.items())
        raise ModelUnavailableError(
            f"model {settings.model}: the hosts have different revisions of it ({each}); "
            "set RINGSERVE_MODEL_REVISION to one commit, or let every host reach the hub"
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


def prepare_model(
    settings: Settings, hosts: Mapping[HostSpec, RemoteHost], console: Console
) -> dict[str, Prepared]:
    """Check the model on this host and every remote one, then fetch it where it is missing.

    Nothing is downloaded unless every host passed its checks. Returns each host's result."""
    here = local_host_name()
    checked: dict[str, Prepared] = {}
    failures: list[RingserveError] = []
    with console.status(f"checking {settings.model} on {1 + len(hosts)} host(s)…"):
        checks: dict[str, Callable[[], Prepared]] = {here: partial(check_here, settings, here)}
        for host in hosts.values():
            checks[host.session.label] = partial(prepare_there, host, settings, "check")
        for label, check in checks.items():
            try:
                checked[label] = check()
            except RingserveError as exc:
                failures.append(exc)
            except Exception as exc:  # a library surprise: one line here, the log keeps it
                log.debug("checking on %s failed", label, exc_info=True)
                failures.append(ModelUnavailableError(f"model {settings.model} on {label}: {exc}"))
    _raise_all(failures)
    check_same_revision(settings, checked)
    check_ring_holds(settings, checked, here)
    for prepared in checked.values():
        if not prepared.missing_files:
            console.print(describe(prepared, settings.model), highlight=False, soft_wrap=True)
    missing = {label: p for label, p in checked.items() if p.missing_files}
    if not missing:
        return checked
    fetched = _fetch_everywhere(settings, hosts, here, missing, console)
    for prepared in fetched.values():
        console.print(
            f"model {settings.model}: downloaded {human_bytes(prepared.missing_bytes)} of weights "
            f"({prepared.missing_files} file(s)) to {prepared.host} in {prepared.seconds:.1f} s",
            highlight=False,
            soft_wrap=True,
        )
    return {**checked, **fetched}


def _fetch_everywhere(
    settings: Settings,
    hosts: Mapping[HostSpec, RemoteHost],
    here: str,
    missing: dict[str, Prepared],
    console: Console,
) -> dict[str, Prepared]:
    """Every host downloads its part at once, one progress bar per host."""
    by_label = {host.session.label: host for host in hosts.values()}
    fetched: dict[str, Prepared] = {}
    failures: list[RingserveError] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {
            label: progress.add_task(f"{label}: {settings.model}", total=p.missing_bytes)
            for label, p in missing.items()
        }

        def run(label: str, checked: Prepared) -> None:
            def advance(done: int, total: int) -> None:
                progress.update(tasks[label], completed=done, total=max(total, 1))

            try:
                if label == here:
                    fetched[label] = fetch_here(settings, checked, advance)
                else:
                    fetched[label] = prepare_there(by_label[label], settings, "fetch", advance)
                progress.update(tasks[label], completed=checked.missing_bytes)
            except RingserveError as exc:
                failures.append(exc)
            except Exception as exc:  # a bug or a library surprise: the log keeps its traceback
                log.debug("fetching on %s failed", label, exc_info=True)
                failures.append(ModelUnavailableError(f"model {settings.model} on {label}: {exc}"))

        threads = [
            # Daemons: an interrupted start ends without waiting for a download to finish.
            threading.Thread(target=run, args=item, name=f"fetch {item[0]}", daemon=True)
            for item in missing.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    _raise_all(failures)
    return fetched
