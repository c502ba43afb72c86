"""The console's server side without a ring: what the API serves at `/` (open, only its own
files, no inline code), the state it answers (behind the key), how each rank's state is read
from rank 0's view, and the live figures counted from rank 0's replies."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ringserve.api.app import create_app
from ringserve.api.console import ASSETS, CONTENT_SECURITY_POLICY
from ringserve.api.console_state import HISTORY_S, LiveFigures, RankView, rank_views
from ringserve.api.metrics import Metrics
from ringserve.config.settings import Settings
from ringserve.ipc.messages import (
    ClusterInfo,
    Done,
    RankShare,
    RingState,
    TelemetryReply,
    Timings,
    Usage,
)
from ringserve.telemetry.nvml import GpuInfo
from ringserve.telemetry.report import RankTelemetry


def api_without_ranks(tmp_path: Path) -> TestClient:
    settings = Settings(api_key="k", socket_path=tmp_path / "nobody.sock")
    return TestClient(create_app(settings))


def info(state: RingState = "serving", reason: str | None = None, **fields: Any) -> ClusterInfo:
    return ClusterInfo(
        model="m",
        model_path="/m",
        ranks=2,
        backend="ring",
        context_limit=4096,
        dtype="float32",
        parameters=1000,
        parallel="pipeline",
        split=(
            RankShare(rank=0, layers=(3, 8), weight_bytes=500, memory_budget=0),
            RankShare(rank=1, layers=(0, 3), weight_bytes=300, memory_budget=2**30),
        ),
        max_request_bytes=1000,
        ready=state == "serving",
        reason=reason,
        state=state,
        **fields,
    )


def report(rank: int, **fields: Any) -> dict[str, Any]:
    """A rank's telemetry as the ranks send it."""
    return RankTelemetry(
        rank=rank,
        hostname=f"host{rank}",
        pid=100 + rank,
        platform="cuda",
        device="NVIDIA H200",
        host_memory_total=64 * 2**30,
        host_memory_available=32 * 2**30,
        mlx_version="0.32",
        **fields,
    ).model_dump(mode="json") | {"model_memory": {"mlx_active": 900, "mlx_peak": 1200}}


def states(views: list[RankView]) -> list[tuple[str, str]]:
    return [(view.state, view.detail) for view in views]


def test_the_page_is_open_loads_only_its_own_files_and_runs_no_inline_code(
    tmp_path: Path,
) -> None:
    api = api_without_ranks(tmp_path)
    page = api.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY
    loaded = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert set(loaded) == {"data:,", *(path for path in ASSETS if path != "/")}
    assert "<script>" not in page.text and not re.search(r"\son\w+\s*=", page.text)  # no inline
    for path in ASSETS:
        first = api.get(path)
        assert first.status_code == 200, path
        again = api.get(path, headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304
    assert sum(len(api.get(path).content) for path in ASSETS) < 80_000  # small to load


def test_the_ring_s_state_needs_the_key_and_says_when_rank_0_does_not_answer(
    tmp_path: Path,
) -> None:
    with api_without_ranks(tmp_path) as api:  # its lifespan runs: the sampler asks in vain
        assert api.get("/console/state").status_code == 401
        wrong = api.get("/console/state", headers={"authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        state = api.get("/console/state", headers={"authorization": "Bearer k"})
        assert "/console/state" in api.get("/openapi.json").json()["paths"]
    assert state.status_code == 200
    body = state.json()
    assert (body["answering"], body["ready"], body["state"]) == (False, False, "unreachable")
    assert body["reason"] and body["model"] is None and body["ranks"] == []


def test_a_serving_ring_shows_each_rank_s_layers_memory_and_gpus() -> None:
    gpu = GpuInfo(index=0, name="H200", memory_total=140 * 2**30, memory_used=2**30)
    reports = {0: (9.0, report(0, gpus=(gpu,))), 1: (10.0, report(1))}
    views = rank_views(info(), True, None, reports, telemetry_s=0.05, now=10.0)
    assert states(views) == [("alive", "answered in 50 ms")] * 2
    assert (views[0].layers, views[0].weight_bytes, views[0].memory_budget) == ((3, 8), 500, None)
    assert (views[1].layers, views[1].memory_budget) == ((0, 3), 2**30)
    assert (views[0].host, views[0].pid, views[0].platform) == ("host0", 100, "cuda")
    assert (views[0].mlx_active_bytes, views[0].host_memory_available) == (900, 32 * 2**30)
    assert views[0].gpus[0]["name"] == "H200" and views[1].gpus == []
    assert (views[0].reported_s_ago, views[1].reported_s_ago) == (1.0, 0.0)


def test_late_telemetry_and_a_waiting_ring_show_the_ranks_slow() -> None:
    late = rank_views(info(), True, None, {}, telemetry_s=2.5, now=0)
    assert states(late) == [("slow", "its telemetry took 2.5 s")] * 2
    missing = rank_views(info(), True, None, {}, telemetry_s=None, now=0)
    assert [view.state for view in missing] == ["alive", "slow"]
    waited = "a rank has not answered for 6.0 s"
    waiting = rank_views(info("waiting", waited), True, None, {}, telemetry_s=None, now=0)
    assert states(waiting) == [("alive", "waits on the others"), ("slow", "the ring waits")]


def test_a_broken_ring_shows_its_lost_ranks_dead_and_a_silent_rank_0_dead() -> None:
    lost = "lost contact with the other ranks ([ring] connection to a peer was lost)"
    reports = {1: (0.0, report(1))}
    broken = rank_views(info("broken", lost), True, None, reports, telemetry_s=None, now=30.0)
    assert states(broken) == [("alive", "answers; the ring broke"), ("dead", "left the ring")]
    assert broken[1].host == "host1" and broken[1].reported_s_ago == 30.0  # last known
    silent = rank_views(info(), False, "the ranks are not answering", reports, None, now=30.0)
    assert states(silent) == [
        ("dead", "not answering: the ranks are not answering"),
        ("unknown", "cannot be seen while rank 0 does not answer"),
    ]
    loading = rank_views(info("loading"), True, None, {}, telemetry_s=None, now=0)
    assert [view.state for view in loading] == ["starting", "starting"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throughput_comes_from_the_ring_s_token_count_across_a_restart() -> None:
    clock = Clock()
    live = LiveFigures(clock)
    assert live.tokens_per_s() is None
    for generated in (0, 100, 300, 300, 20):  # the last: a restarted ring counts from 0
        live.observe(info(generated_tokens=generated))
        clock.now += 0.4
        live.observe(info(generated_tokens=generated + 5))  # within a second: not kept
        clock.now += 0.6
    assert [rate for _, rate in live.throughput()] == [100.0, 200.0, 0.0, 20.0]
    assert [age for age, _ in live.throughput()] == [4.0, 3.0, 2.0, 1.0]  # a second since
    assert live.tokens_per_s() == 80.0  # (100 + 200 + 0 + 20) over 4 s
    clock.now += HISTORY_S + 1
    live.observe(info(generated_tokens=40))
    assert live.throughput() == []  # older samples forgotten


def test_first_token_times_count_queue_wait_and_skip_empty_answers() -> None:
    live = LiveFigures(Clock())
    for queued, first, tokens in ((0.5, 0.25, 10), (0.0, 2.0, 0), (0.1, 0.1, 3)):
        live.observe(
            Done(
                finish_reason="stop",
                usage=Usage(prompt_tokens=5, completion_tokens=tokens),
                timings=Timings(
                    queued_s=queued,
                    first_token_s=first,
                    total_s=3.0,
                    prefill_tokens_per_s=1.0,
                    decode_tokens_per_s=1.0,
                ),
            )
        )
    assert live.first_token_times() == [0.75, 0.2]


def test_metrics_read_gpus_as_the_ranks_report_them() -> None:
    gpu = GpuInfo(index=0, name="H200", memory_total=1000, memory_used=250, utilization_gpu=40)
    telemetry = TelemetryReply(ranks=(report(0, gpus=(gpu,)), report(1)))
    text = Metrics().exposition(info(generated_tokens=77), telemetry).decode()
    samples = {
        (sample.name, sample.labels.get("gpu")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("ringserve_gpu_memory_bytes", "0")] == 1000
    assert samples[("ringserve_gpu_memory_used_bytes", "0")] == 250
    assert samples[("ringserve_gpu_utilization_ratio", "0")] == 0.4
    assert samples[("ringserve_generated_tokens_total", None)] == 77
