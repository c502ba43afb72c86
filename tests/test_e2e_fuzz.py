"""The API fuzzed from its own OpenAPI schema against a real 2-rank ring: whatever a client
sends, valid or not, the answer is never a 5xx and always what the schema declares (status,
content type, body). Bounded: derandomized (a fixed seed), a case budget per operation and
mode, small answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from tests.ring import Ring, running_ring

pytestmark = pytest.mark.e2e

CASES_PER_OPERATION = 60
# Generation runs to max_tokens at most: the budget is cases, not minutes of decoding.
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def fuzzed_ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    with running_ring(tmp_path_factory.mktemp("fuzz"), models_dir, queue_size="64") as ring:
        yield ring


def small_answers(body: Any) -> None:
    if not isinstance(body, dict):
        return
    # A Responses body (it has `input`) names its limit max_output_tokens.
    fields = ("max_output_tokens",) if "input" in body else ("max_tokens", "max_completion_tokens")
    for field in fields:
        # A float with an integral value is a valid count too (556793272769381.0).
        if isinstance(body.get(field), int | float) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if all(body.get(field) is None for field in fields):
        body[fields[0]] = MAX_TOKENS


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_no_input_gets_a_server_error_or_an_undeclared_answer(fuzzed_ring: Ring) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed_ring.url}/openapi.json")
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) >= 7  # every operation's schema is valid
    # Invalid input exists only where there is input: the bodies of the generation routes.
    plans = [(op, GenerationMode.POSITIVE) for op in operations] + [
        (op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"
    ]
    for operation, mode in plans:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=CASES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def exchange(case: Any) -> None:
            small_answers(case.body)
            response = case.call_and_validate(checks=CHECKS, timeout=60)
            # A declared 5xx (503: the ranks are gone) is still a failure here.
            assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"

        exchange()
