"""What the web console shows of the ring, as one JSON answer (`GET /console/state`).

Built from what the API already learns from rank 0: its info (the model, the layout, the queue,
the prefix cache, the ring's state), the ranks' telemetry, and the replies that pass through
the API (first-token times, and the ring's generated-token count for throughput).

A rank's state is read from rank 0's view, the only one the API has: a rank that answered this
telemetry is alive; one the ring waits on too long, or whose telemetry is late, is slow; when a
collective failed the other ranks are out of the ring (each leaves when its collective fails),
and when rank 0 itself does not answer it is dead and the others cannot be seen.
"""

from __future__ import annotations

import collections
import itertools
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from ringserve.ipc.messages import ClusterInfo, Done, Reply

RankState = Literal["alive", "slow", "dead", "unknown", "starting"]
# Telemetry answered later than this marks the ranks slow.
SLOW_TELEMETRY_S = 2.0
# How far back the throughput chart and the first-token times go.
HISTORY_S = 300.0
# Samples of the generated-token count closer than this are not kept (every info call gives one).
SAMPLE_EVERY_S = 1.0
# The window of the "tokens/s now" figure.
RATE_WINDOW_S = 5.0


class RankView(BaseModel):
    rank: int
    state: RankState
    detail: str
    host: str | None = None
    pid: int | None = None
    platform: str | None = None
    device: str | None = None
    cpus: str | None = None
    layers: tuple[int, int] | None = None  # the first layer it runs and one past its last
    weight_bytes: int | None = None
    memory_budget: int | None = None
    mlx_active_bytes: int | None = None  # weights, KV caches and buffers MLX holds now
    mlx_peak_bytes: int | None = None
    host_memory_total: int | None = None
    host_memory_available: int | None = None
    gpus: list[dict[str, Any]] = []
    gpu_reason: str | None = None
    reported_s_ago: float | None = None  # the age of the telemetry shown; None: never reported


class LiveView(BaseModel):
    tokens_per_s: float | None  # generated over the last few seconds; None: too few samples
    running: int | None
    queued: int | None
    generated_tokens: int | None
    ttft_last_s: float | None
    ttft_median_s: float | None  # over the answers of the last minutes
    ttft_count: int
    prefix_cache_hits: int | None
    prefix_cache_lookups: int | None
    prefix_cache_hit_rate: float | None
    prefix_cache_reused_tokens: int | None
    restarts: Any = None  # what the ring reports of its restarts, where it does


class ConsoleState(BaseModel):
    answering: bool  # rank 0 answered this time
    ready: bool
    state: str  # the ring's: loading, serving, waiting, broken; "unreachable" without rank 0
    reason: str | None
    model: dict[str, Any] | None  # /model/info's facts (the last known when rank 0 is silent)
    ranks: list[RankView]
    live: LiveView
    throughput: list[tuple[float, float]]  # (seconds before now, tokens/s), oldest first
    history_s: float


class LiveFigures:
    """Watches every reply rank 0 sends the API: the generated-token count each info carries
    (for throughput) and each answer's time to first token."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.first_tokens: collections.deque[tuple[float, float]] = collections.deque()

    def observe(self, reply: Reply) -> None:
        now = self.clock()
        if isinstance(reply, ClusterInfo):
            if not self.samples or now - self.samples[-1][0] >= SAMPLE_EVERY_S:
                self.samples.append((now, reply.generated_tokens))
        elif isinstance(reply, Done) and reply.usage.completion_tokens:
            self.first_tokens.append((now, reply.timings.queued_s + reply.timings.first_token_s))
        self._forget(now)

    def _forget(self, now: float) -> None:
        for series in (self.samples, self.first_tokens):
            while series and now - series[0][0] > HISTORY_S:
                series.popleft()

    def throughput(self) -> list[tuple[float, float]]:
        """Tokens/s between successive samples, at the later one's age."""
        now = self.clock()
        return [
            (round(now - t1, 1), round(_generated(n0, n1) / (t1 - t0), 2))
            for (t0, n0), (t1, n1) in itertools.pairwise(self.samples)
        ]

    def tokens_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        latest = self.samples[-1][0]
        recent = [s for s in self.samples if latest - s[0] <= RATE_WINDOW_S]
        if len(recent) < 2:
            recent = list(self.samples)[-2:]
        generated = sum(_generated(a, b) for (_, a), (_, b) in itertools.pairwise(recent))
        return round(generated / (recent[-1][0] - recent[0][0]), 2)

    def first_token_times(self) -> list[float]:
        self._forget(self.clock())
        return [seconds for _, seconds in self.first_tokens]


def _generated(before: int, after: int) -> int:
    """Tokens generated between two counts; a smaller count is a restarted ring's."""
    return after - before if after >= before else after


def rank_views(
    info: ClusterInfo | None,
    answering: bool,
    reason: str | None,
    reports: Mapping[int, tuple[float, dict[str, Any]]],
    telemetry_s: float | None,
    now: float,
) -> list[RankView]:
    """Each rank as the console shows it. `info`: rank 0's answer (the last known one when it
    did not answer); `reports`: each rank's last telemetry with the time it came; `telemetry_s`:
    how long this time's telemetry took (None: it did not come)."""
    ranks = info.ranks if info is not None else len(reports)
    split = {share.rank: share for share in info.split} if info is not None else {}
    views = []
    for rank in range(ranks):
        state, detail = _rank_state(rank, info, answering, reason, telemetry_s)
        view = RankView(rank=rank, state=state, detail=detail)
        share = split.get(rank)
        if share is not None:
            view.layers = share.layers
            view.weight_bytes = share.weight_bytes
            view.memory_budget = share.memory_budget or None
        if rank in reports:
            at, report = reports[rank]
            _fill_from_report(view, report)
            view.reported_s_ago = round(now - at, 1)
        views.append(view)
    return views


def _rank_state(
    rank: int,
    info: ClusterInfo | None,
    answering: bool,
    reason: str | None,
    telemetry_s: float | None,
) -> tuple[RankState, str]:
    if not answering or info is None:
        if rank == 0:
            return "dead", f"not answering: {reason or 'no answer'}"
        return "unknown", "cannot be seen while rank 0 does not answer"
    # The ring's reason is shown once beside the ranks; each rank says only its part.
    if info.state == "broken":
        return ("alive", "answers; the ring broke") if rank == 0 else ("dead", "left the ring")
    if info.state == "loading":
        return "starting", "loading the model"
    if info.state == "waiting":
        return ("alive", "waits on the others") if rank == 0 else ("slow", "the ring waits")
    if telemetry_s is None:
        return ("alive", "answering") if rank == 0 else ("slow", _late_telemetry(None))
    if telemetry_s > SLOW_TELEMETRY_S:
        return "slow", _late_telemetry(telemetry_s)
    return "alive", f"answered in {telemetry_s * 1000:.0f} ms"


def _late_telemetry(seconds: float | None) -> str:
    if seconds is None:
        return "its telemetry did not come in time"
    return f"its telemetry took {seconds:.1f} s"


def _fill_from_report(view: RankView, report: Mapping[str, Any]) -> None:
    memory = report.get("model_memory") or {}
    view.host = _str(report.get("hostname"))
    view.pid = _int(report.get("pid"))
    view.platform = _str(report.get("platform"))
    view.device = _str(report.get("device"))
    view.cpus = _str(report.get("cpus"))
    view.mlx_active_bytes = _int(memory.get("mlx_active"))
    view.mlx_peak_bytes = _int(memory.get("mlx_peak"))
    view.host_memory_total = _int(report.get("host_memory_total"))
    view.host_memory_available = _int(report.get("host_memory_available"))
    view.gpus = [dict(gpu) for gpu in report.get("gpus") or () if isinstance(gpu, Mapping)]
    view.gpu_reason = _str(report.get("gpu_reason"))


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def live_view(
    info: ClusterInfo | None, live: LiveFigures, restarts: dict[str, Any] | None = None
) -> LiveView:
    times = live.first_token_times()
    cache = info.prefix_cache if info is not None else {}
    hits, misses = cache.get("hits"), cache.get("misses")
    lookups = hits + misses if hits is not None and misses is not None else None
    return LiveView(
        tokens_per_s=live.tokens_per_s(),
        running=info.running if info is not None else None,
        queued=info.queued if info is not None else None,
        generated_tokens=info.generated_tokens if info is not None else None,
        ttft_last_s=round(times[-1], 3) if times else None,
        ttft_median_s=round(statistics.median(times), 3) if times else None,
        ttft_count=len(times),
        prefix_cache_hits=hits,
        prefix_cache_lookups=lookups,
        prefix_cache_hit_rate=round(hits / lookups, 3) if hits is not None and lookups else None,
        prefix_cache_reused_tokens=cache.get("reused_tokens"),
        restarts=restarts,
    )


def console_state(
    info: ClusterInfo | None,
    answering: bool,
    reason: str | None,
    reports: Mapping[int, tuple[float, dict[str, Any]]],
    telemetry_s: float | None,
    live: LiveFigures,
    now: float,
    restarts: dict[str, Any] | None = None,
) -> ConsoleState:
    """The console's answer; `info` is the last known one when rank 0 did not answer now."""
    return ConsoleState(
        answering=answering,
        ready=answering and info is not None and info.ready,
        state=info.state if answering and info is not None else "unreachable",
        reason=(info.reason if info is not None else None) if answering else reason,
        model=_model_facts(info),
        ranks=rank_views(info, answering, reason, reports, telemetry_s, now),
        live=live_view(info if answering else None, live, restarts),
        throughput=live.throughput(),
        history_s=HISTORY_S,
    )


def _model_facts(info: ClusterInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return info.model_dump(exclude={"kind", "ready", "reason", "state", "queued", "running"})


def reports_by_rank(ranks: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["rank"]: dict(r) for r in ranks if isinstance(r.get("rank"), int)}
