"""What each rank contributes to a telemetry tick (gathered on every rank, used by rank 0)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ringserve.telemetry.report import collect_rank_telemetry


def rank_report(rank: int, extra: Mapping[str, Any] | None = None) -> bytes:
    """This rank's telemetry as JSON bytes, with `extra` sections (JSON-ready) merged in.

    An extra section is a top-level key beside the report's own fields, e.g.
    `{"prefix_cache": prefix_cache.stats()}`; it may not replace one of them.
    """
    report = collect_rank_telemetry(rank).model_dump(mode="json")
    clash = sorted(set(report) & set(extra or {}))
    if clash:
        raise ValueError(f"telemetry sections {clash} would replace fields of the rank's report")
    return json.dumps({**report, **(extra or {})}).encode()
