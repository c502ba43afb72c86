"""The per-host GPU and memory section of `launch.py status`, read from the API's /gpu/info."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape

from ringserve.platform.blas import CpuBlas, blas_summary
from ringserve.telemetry.memory import human_bytes


def _gpu_line(gpu: Mapping[str, Any]) -> str:
    name = gpu.get("name") or "NVIDIA GPU"
    parts = [f"GPU {gpu.get('index', '?')} {name}"]
    used, total = gpu.get("memory_used"), gpu.get("memory_total")
    if isinstance(used, int) and isinstance(total, int):
        parts.append(f"{human_bytes(used)} of {human_bytes(total)} used")
    if gpu.get("utilization_gpu") is not None:
        parts.append(f"{gpu['utilization_gpu']}% busy")
    if gpu.get("temperature_c") is not None:
        parts.append(f"{gpu['temperature_c']} °C")
    if gpu.get("power_draw_w") is not None:
        parts.append(f"{gpu['power_draw_w']} W")
    if len(parts) == 1 and gpu.get("errors"):
        parts.append("unreadable: " + "; ".join(str(e) for e in gpu["errors"].values()))
    return ", ".join(parts)


def gpu_section(ranks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines per host: its memory and GPUs (or why none), then what each rank runs on."""
    by_host: dict[str, list[Mapping[str, Any]]] = {}
    for report in sorted(ranks, key=lambda r: int(r.get("rank", 0))):
        by_host.setdefault(str(report.get("hostname", "?")), []).append(report)
    lines = []
    for host, reports in by_host.items():
        first = reports[0]
        total, available = first.get("host_memory_total"), first.get("host_memory_available")
        memory = (
            f"RAM {human_bytes(total)}, {human_bytes(available)} available"
            if isinstance(total, int) and isinstance(available, int)
            else "RAM unknown"
        )
        lines.append(f"host {host}: {memory}")
        gpus = first.get("gpus") or []
        lines += [f"  {_gpu_line(gpu)}" for gpu in gpus]
        if not gpus:
            lines.append(f"  no GPU listed: {first.get('gpu_reason') or 'no reason given'}")
        for report in reports:
            cpus = f", CPUs {report['cpus']}" if report.get("cpus") else ""
            process = f"pid {report.get('pid')}{cpus}"
            blas = report.get("cpu_blas")
            computes = f"; CPU BLAS {blas_summary(CpuBlas.model_validate(blas))}" if blas else ""
            lines.append(
                f"  rank {report.get('rank')} ({process}): {report.get('device')}{computes}"
            )
            if isinstance(report.get("prefix_cache"), Mapping):
                stats = {**report["prefix_cache"], **(report.get("prefix_cache_bytes") or {})}
                lines.append(f"    {prefix_cache_line(stats)}")
    return lines


def prefix_cache_line(stats: Mapping[str, Any]) -> str:
    """What a rank's prefix cache holds in RAM and on disk, and where its hits came from."""
    if not stats.get("budget_tokens"):
        return "prefix cache: off"
    disk_budget = stats.get("disk_budget_bytes") or 0
    disk = (
        f"disk {human_bytes(stats.get('disk_bytes', 0))} of {human_bytes(disk_budget)} "
        f"({stats.get('disk_entries', 0)} entries)"
        if disk_budget
        else "no disk tier"
    )
    return (
        f"prefix cache: RAM {human_bytes(stats.get('ram_bytes', 0))} "
        f"({stats.get('tokens', 0)} of {stats['budget_tokens']} tokens), {disk}; "
        f"hits {stats.get('ram_hits', 0)} from RAM, {stats.get('disk_hits', 0)} from disk, "
        f"{stats.get('misses', 0)} misses"
    )


def fetch_gpu_info(
    api_url: str, headers: dict[str, str], timeout: float = 35.0
) -> list[dict[str, Any]]:
    reply = httpx.get(f"{api_url}/gpu/info", headers=headers, timeout=timeout)
    reply.raise_for_status()
    ranks: list[dict[str, Any]] = reply.json()["ranks"]
    return ranks


def print_gpu_section(console: Console, api_url: str, headers: dict[str, str]) -> None:
    console.print("[bold]GPUs and memory[/bold] (GET /gpu/info)")
    try:
        lines = gpu_section(fetch_gpu_info(api_url, headers))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        lines = [f"unavailable: {type(exc).__name__}: {exc}"]
    for line in lines:
        console.print(escape(line), highlight=False)


def split_section(info: Mapping[str, Any]) -> list[str]:
    """How the model is split across the ranks, from /model/info: layers and weights per rank."""
    lines = [f"layout: {info.get('parallel', 'single')}"]
    for share in info.get("split") or ():
        first, end = share["layers"]
        budget = share.get("memory_budget") or 0
        allowed = f" (budget {human_bytes(budget)})" if budget else ""
        lines.append(
            f"  rank {share['rank']}: layers {first}-{end - 1} ({end - first}), "
            f"{human_bytes(share['weight_bytes'])} of weights{allowed}"
        )
    return lines


def print_split_section(console: Console, api_url: str, headers: dict[str, str]) -> None:
    console.print("[bold]Model split[/bold] (GET /model/info)")
    try:
        reply = httpx.get(f"{api_url}/model/info", headers=headers, timeout=35.0)
        reply.raise_for_status()
        lines = split_section(reply.json())
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        lines = [f"unavailable: {type(exc).__name__}: {exc}"]
    for line in lines:
        console.print(escape(line), highlight=False)
