"""The ring's restarts as the API shows them (`/health/ready`, `/model/info`, `/metrics`), from
the keeper's report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prometheus_client import Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ringserve.api.errors import RING_STOPPED
from ringserve.ipc.keeper_report import KeeperReport

PREFIX = "ringserve"


def _when(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def restarts_view(report: KeeperReport | None, detailed: bool) -> dict[str, Any]:
    """How many times the keeper restarted the ring, the last time and why, whether a restart
    is under way; `detailed` (not on the open readiness route): ranks, PIDs and hosts."""
    if report is None:
        return {"supervised": False, "count": 0}
    view: dict[str, Any] = {
        "supervised": report.watching(),
        "count": report.restarts,
        "restarting": report.restarting,
        "last_at": _when(report.last_at),
        "last_reason": report.last_reason if detailed else report.last_cause,
        "hosts_left_out": list(report.left_out) if detailed else len(report.left_out),
    }
    if report.gave_up is not None:
        view["gave_up"] = report.gave_up if detailed else "the keeper cannot go on"
    return view


def not_serving(report: KeeperReport | None, reason: str) -> tuple[str, str | None]:
    """Why the ring does not answer, as the open readiness route says it, and the error code
    that goes with it (the ring stopped for good: no Retry-After)."""
    if report is not None and report.restarting:
        return f"the ring is restarting ({report.last_cause})", None
    if report is not None and report.gave_up is not None:
        why = "the ring stopped: the keeper cannot go on (see `launch.py status`)"
        return why, RING_STOPPED
    return reason, None


def restart_families(report: KeeperReport | None) -> list[Metric]:
    restarts = CounterMetricFamily(
        f"{PREFIX}_ring_restarts", "Times the keeper restarted the ring", labels=[]
    )
    restarts.add_metric([], report.restarts if report else 0)
    restarting = GaugeMetricFamily(
        f"{PREFIX}_ring_restarting", "Whether a restart of the ring is under way", labels=[]
    )
    restarting.add_metric([], 1 if report and report.restarting else 0)
    supervised = GaugeMetricFamily(
        f"{PREFIX}_ring_supervised", "Whether a keeper is there to restart the ring", labels=[]
    )
    supervised.add_metric([], 1 if report and report.watching() else 0)
    left_out = GaugeMetricFamily(
        f"{PREFIX}_ring_hosts_left_out", "Hosts left out after failing again and again", labels=[]
    )
    left_out.add_metric([], len(report.left_out) if report else 0)
    families: list[Metric] = [restarts, restarting, supervised, left_out]
    if report is not None and report.last_at is not None:
        last = GaugeMetricFamily(
            f"{PREFIX}_ring_last_restart_timestamp_seconds",
            "When the last restart of the ring began (Unix time)",
            labels=[],
        )
        last.add_metric([], report.last_at)
        families.append(last)
    return families
