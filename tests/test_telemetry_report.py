import json
import os
import socket
import sys
import time
from pathlib import Path

import mlx.core as mx
import pydantic
import pytest

from ringserve.platform.blas import mapped_files
from ringserve.platform.device import PlatformInfo, current_platform, describe
from ringserve.telemetry.nvml import gpu_report_from_answers
from ringserve.telemetry.report import RankTelemetry, collect_rank_telemetry

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"


def test_a_rank_reports_itself_with_real_host_memory() -> None:
    telemetry = collect_rank_telemetry(rank=3)

    assert telemetry.rank == 3
    assert telemetry.hostname == socket.gethostname()
    assert telemetry.pid == os.getpid()
    assert telemetry.platform == current_platform().kind
    assert telemetry.device == describe(current_platform())
    assert 0 < telemetry.host_memory_available <= telemetry.host_memory_total
    assert telemetry.mlx_version == mx.__version__  # type: ignore[attr-defined]
    if not telemetry.gpus:
        assert telemetry.gpu_reason
    if sys.platform.startswith("linux"):  # the BLAS this process really maps
        assert telemetry.cpu_blas is not None
        assert telemetry.cpu_blas.library in mapped_files(Path("/proc/self/maps").read_text())


def test_telemetry_round_trips_through_bytes() -> None:
    telemetry = collect_rank_telemetry(rank=0)
    data = telemetry.model_dump_json()
    assert RankTelemetry.model_validate_json(data) == telemetry


def test_gpu_telemetry_round_trips_through_bytes() -> None:
    report = gpu_report_from_answers(json.loads((FIXTURES / "laptop_gtx1650.json").read_text()))
    cuda = PlatformInfo("cuda", "NVIDIA GeForce GTX 1650", 4294967296, "test")
    telemetry = collect_rank_telemetry(rank=1, platform=cuda).model_copy(
        update={"gpus": report.gpus, "gpu_reason": None}
    )
    back = RankTelemetry.model_validate_json(telemetry.model_dump_json())
    assert back == telemetry
    assert back.gpus[0].errors == {"power_usage": "Not Supported", "power_limit": "Not Supported"}


def test_unknown_fields_are_refused() -> None:
    data = json.loads(collect_rank_telemetry(rank=0).model_dump_json())
    data["surprise"] = 1
    with pytest.raises(pydantic.ValidationError):
        RankTelemetry.model_validate_json(json.dumps(data))


def test_collecting_is_cheap_enough_between_requests() -> None:
    collect_rank_telemetry(rank=0)
    start = time.perf_counter()
    for _ in range(20):
        collect_rank_telemetry(rank=0)
    assert (time.perf_counter() - start) / 20 < 0.05
