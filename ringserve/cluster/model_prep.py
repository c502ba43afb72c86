"""The configured model on every host before any rank starts: checked everywhere first (no
weight downloaded until every host passed), then made present with its progress shown here.

A local directory must be on every host already; a hub model on one host is downloaded there;
a hub model on a ring reaches each host once (`model_distribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from rich.console import Console

from ringserve.cluster.model_distribution import distribute_model, local_host_name
from ringserve.cluster.model_hosts import (
    check_all,
    check_ring_holds,
    describe,
    download_here,
    downloaded,
    prepare_there,
    transfers,
)
from ringserve.cluster.model_plan import ModelReady
from ringserve.cluster.remote import RemoteHost
from ringserve.config.settings import HostSpec, Settings
from ringserve.model.prepare import Prepared, check_here
from ringserve.model.source import looks_like_hub_id


def prepare_model(
    settings: Settings, hosts: Mapping[HostSpec, RemoteHost], console: Console
) -> ModelReady:
    """Check the model on this host and every remote one, then bring it where it is missing.

    Nothing is downloaded unless every host passed its checks."""
    if hosts and looks_like_hub_id(settings.model):
        return distribute_model(settings, hosts, console)
    here = local_host_name()
    checks: dict[str, Callable[[], Prepared]] = {here: partial(check_here, settings, here)}
    for host in hosts.values():
        checks[host.session.label] = partial(prepare_there, host, settings, "check")
    checked = check_all(checks, settings.model, console)
    check_ring_holds(settings, checked, here)
    for prepared in checked.values():
        if not prepared.missing_files:
            console.print(describe(prepared, settings.model), highlight=False, soft_wrap=True)
    mine = checked[here]
    if mine.missing_files:
        with transfers(console) as bar_for:
            checked[here] = download_here(settings, mine, bar_for(f"{here}: {settings.model}"))
        line = downloaded(checked[here], settings.model, mine.missing_bytes, mine.missing_files)
        console.print(line, highlight=False, soft_wrap=True)
    return ModelReady(checked, checked[here].commit)
