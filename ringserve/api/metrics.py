"""`/metrics`: the served model's numbers in Prometheus' text format (`prometheus_client`).

Counted in the API as requests pass: HTTP requests by route and status, and every generation's
tokens, finish and timings (from its `done` reply, whichever endpoint asked). Read from the
ranks at each scrape: readiness, the queue and batch, the prefix cache, and each rank's
telemetry (memory, and GPU memory and utilisation where there are GPUs). From the keeper's
report: the ring's restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringserve.api.restarts import restart_families
from ringserve.ipc.keeper_report import KeeperReport
from ringserve.ipc.messages import ClusterInfo, Done, Reply, TelemetryReply

PREFIX = "ringserve"
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKENS_PER_SECOND = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The counters and histograms the API keeps (one set per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route and status",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished generations", registry=registry
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_prompt_cached_tokens",
            "Prompt tokens read from the prefix cache instead of computed",
            registry=registry,
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated", registry=registry
        )
        self.generations = Counter(
            f"{PREFIX}_generations",
            "Generations ended, by finish reason",
            ["finish_reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a request waited for room in the batch",
            buckets=SECONDS,
            registry=registry,
        )
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from rank 0 receiving a request to its first token (queue wait included)",
            buckets=SECONDS,
            registry=registry,
        )
        self.decode_rate = Histogram(
            f"{PREFIX}_decode_tokens_per_second",
            "Each generation's decode rate after its first token",
            buckets=TOKENS_PER_SECOND,
            registry=registry,
        )
        self.duration = Histogram(
            f"{PREFIX}_generation_duration_seconds",
            "Time from rank 0 receiving a request to its last token",
            buckets=SECONDS,
            registry=registry,
        )

    def observe(self, reply: Reply) -> None:
        """Every reply rank 0 sends passes here; a `done` is counted."""
        if not isinstance(reply, Done):
            return
        usage, timings = reply.usage, reply.timings
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        self.generations.labels(reply.finish_reason).inc()
        self.queue_wait.observe(timings.queued_s)
        self.duration.observe(timings.total_s)
        if usage.completion_tokens:
            self.first_token.observe(timings.queued_s + timings.first_token_s)
        if usage.completion_tokens > 1:
            self.decode_rate.observe(timings.decode_tokens_per_s)

    def exposition(
        self,
        info: ClusterInfo | None,
        telemetry: TelemetryReply | None,
        keeper: KeeperReport | None = None,
    ) -> bytes:
        """The text a scrape gets: the API's own metrics, then the ranks' as they are now, and
        the ring's restarts."""
        ring = _ring_now(info, telemetry, restart_families(keeper))
        return generate_latest(self.registry) + generate_latest(ring)


FamilyKind = type[GaugeMetricFamily] | type[CounterMetricFamily]


def _ring_now(
    info: ClusterInfo | None, telemetry: TelemetryReply | None, restarts: list[Metric]
) -> CollectorRegistry:
    """A registry holding the ring's state as rank 0 reported it for this scrape."""
    families: list[Metric] = list(restarts)

    def family(kind: FamilyKind, name: str, text: str) -> Any:
        made = kind(f"{PREFIX}_{name}", text, labels=[])
        families.append(made)
        return made

    ready = family(GaugeMetricFamily, "ready", "Whether every rank is serving (1) or not (0)")
    ready.add_metric([], 1 if info is not None and info.ready else 0)
    if info is not None:
        for name, text, value in (
            ("ranks", "Ranks in the ring", info.ranks),
            ("queue_depth", "Requests waiting for room in the batch", info.queued),
            ("running_requests", "Requests being generated (the batch)", info.running),
        ):
            family(GaugeMetricFamily, name, text).add_metric([], value)
        generated = "Tokens the ring generated, counted as taken (from 0 again after a restart)"
        family(CounterMetricFamily, "generated_tokens", generated).add_metric(
            [], info.generated_tokens
        )
        for key, kind, name, text in PREFIX_CACHE_METRICS:
            if key in info.prefix_cache:
                family(kind, name, text).add_metric([], info.prefix_cache[key])
        families += _rank_families(info.ranks, telemetry)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return registry


PREFIX_CACHE_METRICS: tuple[tuple[str, FamilyKind, str, str], ...] = (
    ("entries", GaugeMetricFamily, "prefix_cache_entries", "Prompts in rank 0's prefix cache"),
    ("tokens", GaugeMetricFamily, "prefix_cache_tokens", "Tokens of KV in rank 0's prefix cache"),
    ("budget_tokens", GaugeMetricFamily, "prefix_cache_budget_tokens", "Tokens it may keep"),
    ("hits", CounterMetricFamily, "prefix_cache_hits", "Lookups that reused a cached prefix"),
    ("misses", CounterMetricFamily, "prefix_cache_misses", "Lookups that found nothing to reuse"),
    ("reused_tokens", CounterMetricFamily, "prefix_cache_reused_tokens", "Prompt tokens reused"),
    ("evictions", CounterMetricFamily, "prefix_cache_evictions", "Entries evicted for room"),
    ("ram_bytes", GaugeMetricFamily, "prefix_cache_ram_bytes", "Bytes its entries hold in RAM"),
    ("disk_bytes", GaugeMetricFamily, "prefix_cache_disk_bytes", "Bytes its entries hold on disk"),
    ("disk_budget_bytes", GaugeMetricFamily, "prefix_cache_disk_budget_bytes", "Disk it may use"),
    ("disk_entries", GaugeMetricFamily, "prefix_cache_disk_entries", "Prompts it holds on disk"),
    ("ram_hits", CounterMetricFamily, "prefix_cache_ram_hits", "Hits read from RAM"),
    ("disk_hits", CounterMetricFamily, "prefix_cache_disk_hits", "Hits read back from disk"),
    ("spills", CounterMetricFamily, "prefix_cache_spills", "Entries moved from RAM to disk only"),
)


def _rank_families(ranks: int, telemetry: TelemetryReply | None) -> list[Metric]:
    """Each rank's telemetry: up or not, its host's memory, its GPUs' memory and load."""
    rank_labels, gpu_labels = ["rank", "host"], ["rank", "host", "gpu"]
    up = GaugeMetricFamily(
        f"{PREFIX}_rank_up", "Whether the rank answered this scrape's telemetry", labels=["rank"]
    )
    memory = GaugeMetricFamily(
        f"{PREFIX}_host_memory_bytes", "Memory of the rank's host", labels=rank_labels
    )
    available = GaugeMetricFamily(
        f"{PREFIX}_host_memory_available_bytes", "Memory free on its host", labels=rank_labels
    )
    gpu_memory = GaugeMetricFamily(f"{PREFIX}_gpu_memory_bytes", "GPU memory", labels=gpu_labels)
    gpu_used = GaugeMetricFamily(
        f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use", labels=gpu_labels
    )
    gpu_busy = GaugeMetricFamily(
        f"{PREFIX}_gpu_utilization_ratio", "Share of time the GPU was busy", labels=gpu_labels
    )
    reports = {report.get("rank"): report for report in (telemetry.ranks if telemetry else ())}
    for rank in range(ranks):
        report = reports.get(rank)
        up.add_metric([str(rank)], 1 if report is not None else 0)
        if report is None:
            continue
        labels = [str(rank), str(report.get("hostname", ""))]
        _add(memory, labels, report.get("host_memory_total"))
        _add(available, labels, report.get("host_memory_available"))
        for gpu in report.get("gpus") or ():  # as telemetry.nvml.GpuInfo writes them
            at = [*labels, str(gpu.get("index", ""))]
            _add(gpu_memory, at, gpu.get("memory_total"))
            _add(gpu_used, at, gpu.get("memory_used"))
            busy = gpu.get("utilization_gpu")
            _add(gpu_busy, at, busy / 100 if _is_number(busy) else None)
    return [up, memory, available, gpu_memory, gpu_used, gpu_busy]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _add(family: GaugeMetricFamily, labels: list[str], value: Any) -> None:
    """A sample, when the telemetry has a number there (a GPU may refuse a reading)."""
    if _is_number(value):
        family.add_metric(labels, value)


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class CountRequests:
    """ASGI middleware counting every answered HTTP request by route template and status
    (an unknown path counts as `other`, so that a scan cannot make up labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], list[BaseRoute]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self._endpoint(scope)
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope["method"] if endpoint != "other" else "other"
            self.metrics.requests.labels(endpoint, method, str(status)).inc()

    def _endpoint(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"
