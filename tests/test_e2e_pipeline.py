"""A ring of unequal ranks serves the model as a pipeline: each rank runs layers in proportion to
its memory, holds only their weights, and the answers are the one-rank ring's, token for token.

The 8-layer tiny model in float32, greedy, through the whole server (launch.py, the API); and a
gemma3 model, whose layers differ by their place. tests/test_e2e_families.py tries every family.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringserve.distributed.layer_split import model_sizes, pipeline_split, stage_bytes
from ringserve.model.demo import ensure_demo_model
from tests.families import Variant, family_model
from tests.ring import Ring, launch, no_eos, ring_env, rings_together, running_ring

pytestmark = pytest.mark.e2e

# Rank 1 may hold a third of what rank 0 may (1:3), both far more than they need.
BUDGETS = [12_000_000, 4_000_000]
PROMPTS = ["The ring of machines", "Once upon a time, in a land", "def add(a, b):"]
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant who answers briefly."},
    {"role": "user", "content": "Tell me about rings of machines."},
]


def hosts(budgets: list[int]) -> str:
    return json.dumps([{"host": "127.0.0.1", "ranks": len(budgets), "memory_budget": budgets}])


@pytest.fixture(scope="module")
def model(models_dir: Path) -> Path:
    return ensure_demo_model(models_dir, "tiny-deep")


@pytest.fixture(scope="module")
def rings(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[Ring, Ring]]:
    """The pipeline ring and a one-rank reference, started together."""
    root = tmp_path_factory.mktemp("pipeline")
    with pipeline_and_one_rank(root, models_dir, demo_size="tiny-deep") as pair:
        yield pair


def completions(ring: Ring, model: Path, **body: Any) -> list[str]:
    request = {
        "prompt": PROMPTS,
        "max_tokens": 24,
        "temperature": 0,
        "logit_bias": no_eos(model),
        **body,
    }
    with ring.http() as http:
        reply = http.post("/v1/completions", json=request)
    assert reply.status_code == 200, reply.text
    return [choice["text"] for choice in sorted(reply.json()["choices"], key=lambda c: c["index"])]


def chat(ring: Ring, messages: list[dict[str, str]]) -> tuple[str, int]:
    body = {"messages": messages, "max_tokens": 16, "temperature": 0}
    with ring.http() as http:
        reply = http.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": "c1"})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    cached = data["usage"]["prompt_tokens_details"]["cached_tokens"]
    return data["choices"][0]["message"]["content"], cached


def test_the_split_follows_the_budgets_and_each_rank_holds_only_its_layers(
    rings: tuple[Ring, Ring], model: Path
) -> None:
    pipe, _ = rings
    with pipe.http() as http:
        info = http.get("/model/info").json()
    sizes = model_sizes(model, 8)
    split = pipeline_split(sizes, BUDGETS)
    assert info["parallel"] == "pipeline"
    assert [s["layers"] for s in info["split"]] == [[split[1], 8], [0, split[1]]]
    assert split[0] > split[1]  # three times the budget, more layers
    weights = [s["weight_bytes"] for s in info["split"]]
    assert weights == stage_bytes(sizes, split)
    reports = sorted(pipe.rank_reports(), key=lambda r: r["rank"])
    for report, held in zip(reports, weights, strict=True):
        memory = report["model_memory"]
        # MLX holds this rank's weights (and a little KV), never the whole model.
        assert held <= memory["mlx_active"] < held + 2_000_000, (report["rank"], memory)
        # Loading read only this rank's weights.
        assert memory["mlx_peak_load"] < held + 1_000_000, (report["rank"], memory)
    status = pipe.launch("status").stdout
    assert f"rank 1: layers 0-{split[1] - 1}" in status
    assert f"rank 0: layers {split[1]}-7" in status


def test_greedy_answers_equal_the_one_rank_ring_token_for_token(
    rings: tuple[Ring, Ring], model: Path
) -> None:
    pipe, one = rings
    expected = completions(one, model)
    assert completions(pipe, model) == expected
    # Batched with others (three prompts, two choices each), still the same.
    assert completions(pipe, model, n=2) == [text for text in expected for _ in range(2)]


def test_a_warm_prefix_cache_answers_as_a_cold_one(rings: tuple[Ring, Ring], model: Path) -> None:
    pipe, one = rings
    first, _ = chat(pipe, CONVERSATION)
    follow_up = [
        *CONVERSATION,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    warm, cached = chat(pipe, follow_up)
    assert cached > 0
    cold, _ = chat(one, follow_up)
    assert warm == cold
    assert chat(one, CONVERSATION)[0] == first


def test_three_unequal_ranks_answer_as_one(
    rings: tuple[Ring, Ring], tmp_path: Path, models_dir: Path, model: Path
) -> None:
    _, one = rings
    budgets = [9_000_000, 3_000_000, 6_000_000]
    split = pipeline_split(model_sizes(model, 8), budgets)
    with running_ring(
        tmp_path / "three",
        models_dir,
        ranks=3,
        demo_size="tiny-deep",
        parallel="auto",  # unequal budgets: auto is a pipeline
        hosts=hosts(budgets),
    ) as three:
        with three.http() as http:
            info = http.get("/model/info").json()
        assert info["parallel"] == "pipeline"
        assert [s["layers"][1] - s["layers"][0] for s in info["split"]] == split
        assert split[0] > split[2] > split[1]
        assert completions(three, model, n=2) == completions(one, model, n=2)


@contextlib.contextmanager
def pipeline_and_one_rank(
    root: Path, models_dir: Path, **model: str
) -> Iterator[tuple[Ring, Ring]]:
    """The model (`model=` a directory, or `demo_size=`) served by a 2-rank pipeline split
    1:3 and by one rank, started together."""
    with rings_together(
        running_ring(
            root / "pipe",
            models_dir,
            ranks=2,
            parallel="pipeline",
            hosts=hosts(BUDGETS),
            **model,
        ),
        running_ring(root / "one", models_dir, ranks=1, **model),
    ) as (pipe, one):
        yield pipe, one


def test_budgets_too_small_for_the_model_fail_start_naming_the_ranks(
    tmp_path: Path, models_dir: Path, model: Path
) -> None:
    env = ring_env(
        tmp_path / "run",
        models_dir,
        ranks=2,
        demo_size="tiny-deep",
        parallel="pipeline",
        hosts=hosts([3_000_000, 1_000_000]),
    )
    try:
        result = launch(env, "start", check=False)
    finally:
        launch(env, "stop", check=False)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "cannot hold ringserve-tiny-deep split by layers" in output
    assert "rank 0 has 2.9 MiB but needs" in output
    assert "rank 1 has 1.0 MiB but needs" in output


def test_a_sliding_window_family_served_as_a_pipeline_answers_as_one_rank(
    tmp_path: Path, models_dir: Path
) -> None:
    # gemma3: sliding and full attention by layer index, masks built from the first layers'
    # caches, windows shorter than the prompts. Chat and completions through the API.
    gemma = family_model(models_dir, Variant("gemma3_text"))
    with pipeline_and_one_rank(tmp_path, models_dir, model=str(gemma)) as (pipe, one):
        with pipe.http() as http:
            info = http.get("/model/info").json()
        assert info["parallel"] == "pipeline"
        assert [s["layers"] for s in info["split"]] == [[1, 4], [0, 1]]
        assert completions(pipe, gemma) == completions(one, gemma)
        first, _ = chat(pipe, CONVERSATION)
        assert first == chat(one, CONVERSATION)[0]
        follow_up = [
            *CONVERSATION,
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ]
        # A rotated sliding-window cache cannot be trimmed back to a shorter prefix: both
        # rings decide alike whether the first turn is reused.
        assert chat(pipe, follow_up) == chat(one, follow_up)
