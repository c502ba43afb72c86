import json
from pathlib import Path

import pytest

from ringserve.telemetry.nvml import (
    GpuReport,
    cuda_version_text,
    gpu_report_from_answers,
    read_gpu_report,
    read_nvml_answers,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_h100_answers_map_to_a_full_report() -> None:
    report = gpu_report_from_answers(recorded("h100.json"))

    assert report.reason is None
    assert report.driver_version == "550.54.15"
    assert report.cuda_driver_version == "12.4"
    (gpu,) = report.gpus
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_total == 85520809984
    assert gpu.memory_free == 62770905088
    assert (gpu.utilization_gpu, gpu.utilization_memory) == (87, 41)
    assert gpu.temperature_c == 52
    assert gpu.power_draw_w == 412.3
    assert gpu.power_limit_w == 700.0
    assert gpu.errors == {}


def test_unsupported_fields_are_none_and_a_lost_gpu_is_still_listed() -> None:
    report = gpu_report_from_answers(recorded("laptop_gtx1650.json"))

    laptop, lost = report.gpus
    assert laptop.name == "NVIDIA GeForce GTX 1650"
    assert laptop.memory_free == 3884974080
    assert laptop.power_draw_w is None and laptop.power_limit_w is None
    assert laptop.errors == {"power_usage": "Not Supported", "power_limit": "Not Supported"}
    assert lost.index == 1 and lost.name is None and lost.memory_total is None
    assert lost.errors == {"handle": "GPU is lost"}


def test_no_gpu_and_no_nvml_give_a_reason_not_an_error() -> None:
    assert gpu_report_from_answers({"driver_version": "550.54.15", "gpus": []}).reason == (
        "no NVIDIA GPU"
    )
    failed = gpu_report_from_answers({"error": "NVML not available: Driver Not Loaded"})
    assert failed.gpus == () and failed.reason == "NVML not available: Driver Not Loaded"


def test_report_survives_a_json_round_trip() -> None:
    report = gpu_report_from_answers(recorded("laptop_gtx1650.json"))
    assert GpuReport.model_validate_json(report.model_dump_json()) == report


@pytest.mark.parametrize(("encoded", "text"), [(12040, "12.4"), (13000, "13.0"), (11080, "11.8")])
def test_cuda_version_text(encoded: int, text: str) -> None:
    assert cuda_version_text(encoded) == text


def test_read_gpu_report_on_this_host_never_raises() -> None:
    answers = read_nvml_answers()
    report = read_gpu_report()
    if "error" in answers:
        assert report.gpus == ()
        assert report.reason is not None and report.reason.startswith("NVML not available: ")
    else:
        assert report.reason is None or report.reason == "no NVIDIA GPU"
