"""NVIDIA GPU telemetry through NVML: a thin reader of raw answers and a pure mapping to a report.

The reader records what NVML answered, field by field, as plain JSON-like data; a field NVML
refuses (a consumer board without power readings, say) is recorded as `{"error": "..."}`.
`gpu_report_from_answers` turns those answers into a `GpuReport`, so the mapping is tested on
recorded answers without a GPU.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pynvml
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

Answers = dict[str, Any]


class GpuInfo(BaseModel):
    """One GPU as NVML sees it; a field the board does not report is None, with the reason in
    `errors`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    name: str | None = None
    uuid: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    utilization_gpu: int | None = None
    utilization_memory: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    errors: dict[str, str] = {}


class GpuReport(BaseModel):
    """Every NVIDIA GPU of this host, or none with the reason why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: tuple[GpuInfo, ...] = ()
    reason: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None


# --- the pure mapping ---------------------------------------------------------------------------


def _answer(answers: Mapping[str, Any], key: str, errors: dict[str, str]) -> Any:
    value = answers.get(key)
    if isinstance(value, Mapping) and "error" in value:
        errors[key] = str(value["error"])
        return None
    return value


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def _watts(milliwatts: Any) -> float | None:
    return round(milliwatts / 1000.0, 1) if isinstance(milliwatts, (int, float)) else None


def cuda_version_text(version: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _gpu_from_answers(answers: Mapping[str, Any]) -> GpuInfo:
    errors: dict[str, str] = {}
    memory = _answer(answers, "memory", errors) or {}
    utilization = _answer(answers, "utilization", errors) or {}
    name = _answer(answers, "name", errors)
    uuid = _answer(answers, "uuid", errors)
    _answer(answers, "handle", errors)
    return GpuInfo(
        index=int(answers["index"]),
        name=str(name) if name is not None else None,
        uuid=str(uuid) if uuid is not None else None,
        memory_total=_int(memory.get("total")),
        memory_used=_int(memory.get("used")),
        memory_free=_int(memory.get("free")),
        utilization_gpu=_int(utilization.get("gpu")),
        utilization_memory=_int(utilization.get("memory")),
        temperature_c=_int(_answer(answers, "temperature", errors)),
        power_draw_w=_watts(_answer(answers, "power_usage", errors)),
        power_limit_w=_watts(_answer(answers, "power_limit", errors)),
        errors=errors,
    )


def gpu_report_from_answers(answers: Mapping[str, Any]) -> GpuReport:
    """Map recorded NVML answers (the shape `read_nvml_answers` returns) to a report."""
    if "error" in answers:
        return GpuReport(reason=str(answers["error"]))
    ignored: dict[str, str] = {}
    driver = _answer(answers, "driver_version", ignored)
    cuda = _answer(answers, "cuda_driver_version", ignored)
    gpus = tuple(_gpu_from_answers(gpu) for gpu in answers.get("gpus", ()))
    return GpuReport(
        gpus=gpus,
        reason=None if gpus else "no NVIDIA GPU",
        driver_version=str(driver) if driver is not None else None,
        cuda_driver_version=cuda_version_text(cuda) if isinstance(cuda, int) else None,
    )


# --- the reader ---------------------------------------------------------------------------------

_lock = threading.Lock()
_initialised = False
_init_error: str | None = None


def ensure_initialised() -> str | None:
    """Initialise NVML once per process; return why it cannot be used, or None when it can."""
    global _initialised, _init_error
    with _lock:
        if _initialised:
            return None
        if _init_error is None:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                # A missing library or driver does not appear while the process runs.
                _init_error = f"NVML not available: {exc}"
                return _init_error
            _initialised = True
            atexit.register(shutdown)
        return _init_error


def shutdown() -> None:
    global _initialised
    with _lock:
        if not _initialised:
            return
        _initialised = False
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)


def _ask(question: Callable[..., Any], *args: Any) -> Any:
    try:
        return question(*args)
    except pynvml.NVMLError as exc:
        return {"error": str(exc)}


def _memory(handle: Any) -> dict[str, int]:
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return {"total": int(info.total), "used": int(info.used), "free": int(info.free)}


def _utilization(handle: Any) -> dict[str, int]:
    rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
    return {"gpu": int(rates.gpu), "memory": int(rates.memory)}


def _temperature(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


def _gpu_answers(index: int) -> Answers:
    handle = _ask(pynvml.nvmlDeviceGetHandleByIndex, index)
    if isinstance(handle, dict) and "error" in handle:
        return {"index": index, "handle": handle}
    return {
        "index": index,
        "name": _ask(pynvml.nvmlDeviceGetName, handle),
        "uuid": _ask(pynvml.nvmlDeviceGetUUID, handle),
        "memory": _ask(_memory, handle),
        "utilization": _ask(_utilization, handle),
        "temperature": _ask(_temperature, handle),
        "power_usage": _ask(pynvml.nvmlDeviceGetPowerUsage, handle),
        "power_limit": _ask(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle),
    }


def read_nvml_answers() -> Answers:
    """Ask NVML everything the report needs; never raises for an NVML error."""
    problem = ensure_initialised()
    if problem is not None:
        return {"error": problem}
    count = _ask(pynvml.nvmlDeviceGetCount)
    if isinstance(count, dict):
        return {"error": f"NVML could not count GPUs: {count['error']}"}
    return {
        "driver_version": _ask(pynvml.nvmlSystemGetDriverVersion),
        "cuda_driver_version": _ask(pynvml.nvmlSystemGetCudaDriverVersion),
        "gpus": [_gpu_answers(index) for index in range(count)],
    }


def read_gpu_report() -> GpuReport:
    return gpu_report_from_answers(read_nvml_answers())
