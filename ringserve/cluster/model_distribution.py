"""A hub model on a ring of hosts reaches each host once: the host that holds the revision (this
one first, then the others as configured) or, when none does, this host after downloading it is
the origin; every other host receives over its SSH connection only the files its ranks need, or
downloads that share from the hub itself when told to (`"fetch": "hub"` in RINGSERVE_HOSTS).

Hosts that receive the model never ask the hub (their check looks in their cache only); what
they hold is checked against the hub's hashes on their side; the launcher decides everything
else from their reports (`model_plan`) and moves the files (`model_copy`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from rich.console import Console

from ringserve.cluster.hosts import Placement, rank_placements
from ringserve.cluster.model_copy import (
    Endpoint,
    LocalFiles,
    Received,
    RemoteFiles,
    Settle,
    receive,
)
from ringserve.cluster.model_hosts import (
    Bar,
    check_all,
    check_ring_holds,
    describe,
    download_here,
    downloaded,
    prepare_there,
    raise_all,
    settle_there,
    transfers,
)
from ringserve.cluster.model_plan import (
    ModelReady,
    Origin,
    Shares,
    check_disk_room,
    choose_origin,
    plan_shares,
    still_needed,
    wanted_files,
)
from ringserve.cluster.remote import RemoteHost
from ringserve.config.settings import HostSpec, Settings
from ringserve.distributed.layer_files import file_layers, read_weight_map
from ringserve.distributed.layer_split import combined, file_sizes, read_header
from ringserve.errors import ModelUnavailableError, RingserveError
from ringserve.model import store
from ringserve.model.prepare import Prepared, check_here, fetch_here, tensor_expected
from ringserve.model.source import check_model_dir
from ringserve.model.store import CachedFile
from ringserve.platform.addresses import detect_local_host, local_addresses
from ringserve.platform.preflight import check_memory_fits
from ringserve.telemetry.memory import human_bytes

log = logging.getLogger(__name__)

Job = Callable[[Bar], Prepared | Received]


def local_host_name() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class Ring:
    """The ring's hosts as the model's preparation names them."""

    here: str
    order: list[str]  # this host, then the others as RINGSERVE_HOSTS lists them
    index: dict[str, int]  # a host's place in RINGSERVE_HOSTS
    remote: dict[str, RemoteHost]
    placements: list[Placement]

    @classmethod
    def of(cls, settings: Settings, hosts: Mapping[HostSpec, RemoteHost]) -> Ring:
        here = local_host_name()
        placements = rank_placements(settings, detect_local_host(settings.hosts, local_addresses()))
        index = {here: placements[0].host_index}
        remote = {}
        for host in hosts.values():
            index[host.session.label] = settings.hosts.index(host.spec)
            remote[host.session.label] = host
        order = sorted(index, key=lambda label: (label != here, index[label]))
        return cls(here, order, index, remote, placements)

    def spec(self, settings: Settings, label: str) -> HostSpec:
        return settings.hosts[self.index[label]]

    def receives(self, settings: Settings, label: str) -> bool:
        """Whether the host gets the model from the origin rather than from the hub."""
        return self.spec(settings, label).fetch == "copy"


def distribute_model(
    settings: Settings, hosts: Mapping[HostSpec, RemoteHost], console: Console
) -> ModelReady:
    """Check every host, choose the origin and let it download what it lacks, plan each host's
    share, then copy (or let a host fetch) every share at once, one progress bar per host."""
    ring = Ring.of(settings, hosts)
    name = settings.model
    checked, not_cached = _check(settings, ring, console)
    origin = choose_origin(name, checked, ring.order, ring.here)
    if origin is None:
        raise not_cached or ModelUnavailableError(
            f"model {name}: no host holds it in its Hugging Face cache and this host cannot "
            "download it (the hub is unreachable, or HF_HUB_OFFLINE is set); let this host "
            "reach the hub, or fill one host's cache"
        )
    check_ring_holds(settings, checked, ring.here)
    pinned = settings.model_copy(update={"model_revision": origin.commit})
    if origin.download:
        mine = checked[ring.here]
        with transfers(console) as bar_for:
            checked[ring.here] = download_here(pinned, mine, bar_for(f"{ring.here}: {name}"))
        line = downloaded(checked[ring.here], name, mine.missing_bytes, mine.missing_files)
        console.print(line, highlight=False, soft_wrap=True)
    copies = Copies(pinned, ring, checked, origin, settings.model_revision or "main")
    model_dir = copies.config_here(console)
    shares = _plan(pinned, ring, checked, copies, model_dir)
    jobs = _jobs(pinned, ring, checked, shares, copies, model_dir)
    for label in ring.order:
        if label not in jobs and not (label == origin.host and origin.download):
            line = _holds(name, checked[label], label == origin.host, shares, ring.index[label])
            console.print(line, highlight=False, soft_wrap=True)
    for label, outcome in _run(jobs, name, console).items():
        if isinstance(outcome, Prepared):
            checked[label] = outcome
        console.print(_done(name, label, outcome, origin), highlight=False, soft_wrap=True)
    if shares.layout == "pipeline":
        console.print(
            f"model {name}: a pipeline of {':'.join(map(str, shares.split))} layers (rank 0 "
            "first); each host holds the files of its ranks' layers",
            highlight=False,
            soft_wrap=True,
        )
    return ModelReady(checked, origin.commit, shares.split)


def _check(
    settings: Settings, ring: Ring, console: Console
) -> tuple[dict[str, Prepared], RingserveError | None]:
    """Every host's check; this host looks only in its cache when it cannot fetch the model
    (another host may hold it), and so does every host that receives it."""
    from ringserve.model.hub import NotCached

    not_cached: list[RingserveError] = []

    def check_this_host() -> Prepared:
        try:
            return check_here(settings, ring.here)
        except NotCached as exc:
            not_cached.append(exc)
            return check_here(settings, ring.here, receives=True)

    checks: dict[str, Callable[[], Prepared]] = {ring.here: check_this_host}
    for label in ring.order[1:]:
        host = ring.remote[label]
        receives = ring.receives(settings, label)
        checks[label] = partial(prepare_there, host, settings, "check", receives=receives)
    checked = check_all(checks, settings.model, console)
    return checked, (not_cached[0] if not_cached else None)


@dataclass
class Copies:
    """The origin's files, and reaching every host's cache to copy them there."""

    settings: Settings
    ring: Ring
    checked: dict[str, Prepared]
    origin: Origin
    revision: str  # the branch or tag the hosts' caches point at the commit
    lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def manifest(self) -> dict[str, CachedFile]:
        """The origin's snapshot: every file mlx-lm loads, with its size and the hub's hash."""
        from huggingface_hub.utils import filter_repo_objects

        from ringserve.model.hub import fetch_patterns

        holding = self.checked[self.origin.host].holding
        assert holding is not None and holding.commit == self.origin.commit
        files = {
            name: holding.files[name]
            for name in filter_repo_objects(holding.files, allow_patterns=fetch_patterns())
        }
        unnamed = sorted(name for name, cached in files.items() if not cached.etag)
        if unnamed:
            raise ModelUnavailableError(
                f"model {self.settings.model} on {self.origin.host}: its cache keeps "
                f"{', '.join(unnamed[:3])} without the hub's hash (not linked to a blob), so a "
                "copy of it could not be checked; let huggingface_hub download it there again"
            )
        return files

    @contextlib.contextmanager
    def endpoint(self, label: str) -> Iterator[Endpoint]:
        """One end of a copy, over a host's own SFTP channel (copies run at once)."""
        holding = self.checked[label].holding
        assert holding is not None
        snapshot = self.checked[label].path if label == self.origin.host else ""
        if label == self.ring.here:
            yield Endpoint(label, LocalFiles(), holding.repo_dir, snapshot)
            return
        sftp = self.ring.remote[label].session.sftp()
        try:
            yield Endpoint(label, RemoteFiles(sftp), holding.repo_dir, snapshot)
        finally:
            sftp.close()

    def settle(self, label: str) -> Settle:
        if label == self.ring.here:
            return partial(store.settle, self.settings.model, self.origin.commit, self.revision)
        return partial(settle_there, self.ring.remote[label], self.settings, self.revision)

    def receive(self, label: str, wanted: Mapping[str, CachedFile], bar: Bar | None) -> Received:
        with self.endpoint(self.origin.host) as origin, self.endpoint(label) as target:
            return receive(
                origin,
                target,
                wanted,
                self.settle(label),
                bar.advance if bar else lambda n: None,
                bar.grow if bar else lambda n: None,
                self.settings.model,
            )

    def config_here(self, console: Console) -> Path:
        """This host's snapshot with the config and index in it (received first when another
        host is the origin: the plan reads them here), the model's architecture checked."""
        mine = self.checked[self.ring.here]
        if self.origin.host == self.ring.here:
            return Path(mine.path)
        metadata = {n: c for n, c in self.manifest.items() if not n.endswith(".safetensors")}
        with console.status(f"receiving the config of {self.settings.model}…"):
            self.receive(self.ring.here, metadata, None)
        assert mine.holding is not None
        model_dir = Path(mine.holding.repo_dir) / "snapshots" / self.origin.commit
        settings = self.settings
        check_model_dir(
            model_dir,
            settings.model,
            self.ring.here,
            settings.world_size,
            settings.trust_remote_code,
            need_weights=False,
            parallel=settings.parallel,
        )
        return model_dir

    def headers(self, names: list[str]) -> list[dict[str, Any]]:
        """The safetensors headers of the origin's files (a few kilobytes each)."""
        found = []
        with self.endpoint(self.origin.host) as origin:
            for name in names:
                path = os.path.join(origin.snapshot, name)
                if isinstance(origin.files, RemoteFiles):
                    with origin.files.sftp.open(path, "rb") as handle:
                        found.append(read_header(handle))
                else:
                    with open(path, "rb") as handle:
                        found.append(read_header(handle))
        return found


def _plan(
    settings: Settings,
    ring: Ring,
    checked: Mapping[str, Prepared],
    copies: Copies,
    model_dir: Path,
) -> Shares:
    """The layout and split the ranks will use, and each host's files, from the config and
    index here and the headers of the origin's files."""
    from ringserve.model.splits import model_skeleton, split_choices

    config = json.loads((model_dir / "config.json").read_text())
    num_layers = int(config.get("text_config", config)["num_hidden_layers"])
    weights = sorted(name for name in copies.manifest if name.endswith(".safetensors"))
    sizes = combined([file_sizes(h, num_layers) for h in copies.headers(weights)], num_layers)
    skeleton = model_skeleton(model_dir, config, settings.trust_remote_code)
    choices = split_choices(skeleton, config, settings.world_size)
    memory = {}
    for label, prepared in checked.items():
        assert prepared.memory is not None
        memory[ring.index[label]] = prepared.memory
    return plan_shares(
        settings,
        ring.placements,
        memory,
        sizes,
        file_layers(weights, read_weight_map(model_dir), num_layers),
        tensor_splits=choices.tensor is not None,
        pipeline_splits=choices.pipeline_problem is None,
    )


def _jobs(
    settings: Settings,
    ring: Ring,
    checked: Mapping[str, Prepared],
    shares: Shares,
    copies: Copies,
    model_dir: Path,
) -> dict[str, Job]:
    """What each host other than the origin still needs, as a job: a copy of the files it
    lacks, or its share downloaded there. A host refused for its disk or memory is named
    before any weight moves."""
    name = settings.model
    weight_bytes = sum(c.size for n, c in copies.manifest.items() if n.endswith(".safetensors"))
    jobs: dict[str, Job] = {}
    failures: list[RingserveError] = []
    for label in ring.order:
        if label == copies.origin.host:
            continue
        held = checked[label]
        share = shares.files[ring.index[label]]
        wanted = wanted_files(copies.manifest, share)
        if not ring.receives(settings, label):
            weights = sorted(share) if shares.layout == "pipeline" else None
            if still_needed(wanted, held, copies.origin.commit, checked=False):
                jobs[label] = partial(_fetch_job, ring, label, settings, weights)
            continue
        needed = still_needed(wanted, held, copies.origin.commit)
        try:
            if tensor_expected(settings, model_dir) and held.memory is not None:
                check_memory_fits(held.memory, settings, weight_bytes, name, label)
            check_disk_room(name, label, sum(c.size for c in needed.values()), held)
        except RingserveError as exc:
            failures.append(exc)
            continue
        if needed:
            jobs[label] = partial(_receive, copies, label, wanted)
    raise_all(failures)
    return jobs


def _fetch_job(
    ring: Ring, label: str, settings: Settings, weights: list[str] | None, bar: Bar
) -> Prepared:
    """A host told to fetch for itself downloads its share from the hub (this host too)."""
    if label == ring.here:
        checked = check_here(settings, label, weights=weights)
        fetched = fetch_here(settings, checked, bar.show, weights)
    else:
        fetched = prepare_there(ring.remote[label], settings, "fetch", bar.show, weights=weights)
    bar.finish()
    return fetched


def _receive(copies: Copies, label: str, wanted: Mapping[str, CachedFile], bar: Bar) -> Received:
    received = copies.receive(label, wanted, bar)
    bar.finish()
    return received


def _run(jobs: Mapping[str, Job], name: str, console: Console) -> dict[str, Prepared | Received]:
    """Every job at once, one progress bar each; one line per host that failed."""
    if not jobs:
        return {}
    done: dict[str, Prepared | Received] = {}
    failures: list[RingserveError] = []
    with transfers(console) as bar_for:
        bars = {label: bar_for(f"{label}: {name}") for label in jobs}

        def run(label: str) -> None:
            try:
                done[label] = jobs[label](bars[label])
            except RingserveError as exc:
                failures.append(exc)
            except Exception as exc:  # a bug or a library surprise: the log keeps it
                log.debug("bringing the model to %s failed", label, exc_info=True)
                reason = f"{type(exc).__name__}: {exc}"
                failures.append(ModelUnavailableError(f"model {name} on {label}: {reason}"))

        threads = [
            # Daemons: an interrupted start ends without waiting for a transfer to finish.
            threading.Thread(target=run, args=(label,), name=f"model {label}", daemon=True)
            for label in jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    raise_all(failures)
    return {label: done[label] for label in jobs}


def _holds(name: str, held: Prepared, origin: bool, shares: Shares, index: int) -> str:
    """The line for a host that needs nothing moved."""
    if origin or shares.layout != "pipeline":
        return describe(held, name)
    files = shares.files[index]
    size = sum(
        cached.size
        for file, cached in (held.holding.files.items() if held.holding else ())
        if file in files
    )
    revision = f", revision {held.commit[:12]}" if held.commit else ""
    return (
        f"model {name}: cached on {held.host} (its ranks' share: {len(files)} weight file(s), "
        f"{human_bytes(size)}{revision})"
    )


def _done(name: str, label: str, outcome: Prepared | Received, origin: Origin) -> str:
    if isinstance(outcome, Prepared):
        return downloaded(outcome, name, outcome.missing_bytes, outcome.missing_files)
    line = (
        f"model {name}: copied {outcome.files} file(s), {human_bytes(outcome.bytes)}, from "
        f"{origin.host} to {label} in {outcome.seconds:.1f} s"
    )
    if outcome.resumed:
        line += f" ({outcome.resumed} resumed where an earlier copy stopped)"
    if outcome.broken:
        line += f"; replaced {len(outcome.broken)} broken file(s): {', '.join(outcome.broken)}"
    return line
