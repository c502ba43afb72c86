"""A request that fails while it is served ends with an error, and the ring goes on serving.

The ring serves the tiny model through an architecture file that fails on purpose
(tests/fixtures/faulty/faulty_model.py, loaded with RINGSERVE_TRUST_REMOTE_CODE): in the prefill
on every rank, midway through an answer on every rank, and on rank 1 alone (a RuntimeError, as
a failed collective raises). After each failure both ranks are alive, answer the next request,
and hold the same prefix-cache decisions.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringserve.cluster.local import pid_alive
from ringserve.model.demo import ensure_demo_model
from tests.fixtures.faulty.faulty_model import DIVERGE_FLAG, FAIL_POSITION, FAIL_TOKEN, RANK1_FLAG
from tests.ring import Ring, no_eos, running_ring

pytestmark = pytest.mark.e2e

FAULTY = Path(__file__).parent / "fixtures" / "faulty" / "faulty_model.py"


def faulty_model(models_dir: Path, where: Path) -> Path:
    """The tiny demo model, its architecture replaced by the faulty one."""
    tiny = ensure_demo_model(models_dir, "tiny")
    where.mkdir()
    for item in tiny.iterdir():
        if item.name != "config.json":
            (where / item.name).symlink_to(item)
    config = json.loads((tiny / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**config, "model_file": FAULTY.name}))
    shutil.copy(FAULTY, where / FAULTY.name)
    return where


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    root = tmp_path_factory.mktemp("faulty")
    model = faulty_model(models_dir, root / "model")
    with running_ring(root / "run", models_dir, model=str(model), trust_remote_code="true") as r:
        yield r


def complete(ring: Ring, prompt: list[int], **extra: Any) -> httpx.Response:
    body = {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    with ring.http() as http:
        return http.post("/v1/completions", json=body)


def assert_still_serving(ring: Ring) -> None:
    assert all(pid_alive(pid) for pid in ring.pids())
    reply = complete(ring, [20, 21, 22])
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    with ring.http() as http:
        assert http.get("/health/ready").status_code == 200
        ranks = http.get("/gpu/info", timeout=60).json()["ranks"]
    first, second = (rank["prefix_cache"] for rank in ranks)
    assert first == second  # the same cache decisions on both ranks, digest included


def test_a_prefill_that_fails_on_every_rank_ends_the_request_only(ring: Ring) -> None:
    reply = complete(ring, [FAIL_TOKEN, 30, 31])
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "generation_failed")
    assert "the faulty model met its fail token" in error["message"]
    assert_still_serving(ring)


def test_an_answer_that_fails_midway_ends_its_stream_with_an_error_event(
    ring: Ring, models_dir: Path
) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Tell me about the ring."}],
        "max_tokens": 2 * FAIL_POSITION,
        "temperature": 0,
        "stream": True,
        "logit_bias": no_eos(models_dir / "ringserve-tiny"),
    }
    events: list[dict[str, Any]] = []
    with (
        ring.http() as http,
        http.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert "data: [DONE]" not in lines
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
    assert text  # the answer had begun
    assert events[-1]["error"]["code"] == "generation_failed"
    assert f"fails at position {FAIL_POSITION}" in events[-1]["error"]["message"]
    assert_still_serving(ring)


def test_a_failure_on_one_rank_alone_ends_the_request_on_every_rank(ring: Ring) -> None:
    model_dir = Path(ring.env["RINGSERVE_MODEL"])
    (model_dir / RANK1_FLAG).touch()
    reply = complete(ring, [40, 41, 42, 43])  # a prompt no cache entry holds: a new cache
    assert not (model_dir / RANK1_FLAG).exists()
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["code"] == "generation_failed"
    assert "another rank" in error["message"]
    assert_still_serving(ring)


def test_ranks_that_take_different_tokens_end_the_batch_loudly(ring: Ring) -> None:
    model_dir = Path(ring.env["RINGSERVE_MODEL"])
    (model_dir / DIVERGE_FLAG).touch()
    try:
        reply = complete(ring, [60, 61, 62], max_tokens=8)
    finally:
        (model_dir / DIVERGE_FLAG).unlink()
    assert reply.status_code == 500
    assert "took other tokens than rank 0" in reply.json()["error"]["message"]
    assert_still_serving(ring)
