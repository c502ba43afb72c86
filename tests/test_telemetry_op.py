import json
import os

import pytest

from ringserve.engine.telemetry_op import rank_report
from ringserve.telemetry.report import RankTelemetry


def test_a_rank_reports_its_telemetry_as_json() -> None:
    report = json.loads(rank_report(1))
    assert report["rank"] == 1
    assert report["pid"] == os.getpid()
    assert RankTelemetry.model_validate(report).host_memory_total > 0


def test_other_parts_of_a_rank_add_their_own_sections() -> None:
    report = json.loads(rank_report(0, extra={"prefix_cache": {"entries": 2, "tokens": 40}}))
    assert report["prefix_cache"] == {"entries": 2, "tokens": 40}
    assert report["rank"] == 0 and "host_memory_available" in report


def test_a_section_may_not_replace_the_report_s_own_fields() -> None:
    with pytest.raises(ValueError, match="rank"):
        rank_report(0, extra={"rank": 5})
