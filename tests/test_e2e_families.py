"""Every family users bring splits across a real ring, and answers exactly as one rank does.

Tiny random-weight models of 17 families, built from each family's own mlx-lm classes (and
quantized variants of each block shape), are served on real MLX rings of local processes by
the engine every rank runs (tests/split_worker.py): one rank; two ranks as `auto` chooses with
alike ranks (a tensor split, or a pipeline for the recurrent hybrids); two ranks as a pipeline
split 1:3 by memory; three unequal ranks for the sliding-window families. Greedy answers to
three prompts decoded together, and a follow-up served from the prefix cache, must be the
one rank's token for token. docs/models.md is the table these runs produce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from ringserve.distributed.layer_split import model_sizes
from ringserve.errors import ModelError
from ringserve.model.splits import SplitRefused, check_splittable
from tests.families import FAMILIES, Variant, family_model
from tests.ring import refused, ring_env
from tests.split_ring import run_split_ring

pytestmark = pytest.mark.e2e

QUANTIZED = [
    Variant("llama", 4, mixed=True),
    Variant("mixtral", 4),
    Variant("phi3", 4),
    Variant("olmo2", 4),
    Variant("gemma3_text", 4),
    Variant("deepseek_v3", 4),
    Variant("lfm2", 4),
]
VARIANTS = [Variant(family) for family in FAMILIES] + QUANTIZED
RECURRENT = {"lfm2", "qwen3_next"}  # hybrids whose state is not split by heads
SLIDING = ["gemma3_text", "gpt_oss"]
# Longer than the families' sliding windows (12 tokens), so rotating caches wrap.
PROMPTS = [
    "The ring of machines serves one large model to many clients at once",
    "Once upon a time, in a land far away, there lived",
    "def add(a, b):\n    return",
]
FOLLOW_UP = " And then what happened next?"
MAX_TOKENS = 20
DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict[str, Path]:
    return {variant.name: family_model(models_dir, variant) for variant in VARIANTS}


def one_layer_budget(model: Path) -> int:
    """Room for one layer beside what every rank holds (embedding, head), with headroom."""
    config = json.loads((model / "config.json").read_text())
    sizes = model_sizes(model, config["num_hidden_layers"])
    return int(1.3 * (sizes.shared_bytes + max(sizes.layer_bytes)))


def jobs(
    models: dict[str, Path], names: list[str], parallel: str, budgets: Any
) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(next(iter(models.values())))
    prompts = [tokenizer.encode(prompt) for prompt in PROMPTS]
    return [
        {
            "name": name,
            "path": str(models[name]),
            "parallel": parallel,
            "budgets": budgets(models[name]) if callable(budgets) else budgets,
            "prompts": prompts,
            "follow_up": tokenizer.encode(FOLLOW_UP),
            "max_tokens": MAX_TOKENS,
        }
        for name in names
    ]


@pytest.fixture(scope="module")
def runs(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every variant on one rank, on two alike ranks (auto), on two ranks as a pipeline 1:3;
    the sliding-window families on three unequal ranks. One ring per layout."""
    root = tmp_path_factory.mktemp("families")
    names = list(models)
    alike = 10 * max(one_layer_budget(model) for model in models.values())

    def one_to_three(model: Path) -> list[int]:
        return [3 * one_layer_budget(model), one_layer_budget(model)]

    def three_unequal(model: Path) -> list[int]:
        return [3 * one_layer_budget(model), one_layer_budget(model), 2 * one_layer_budget(model)]

    return {
        "one": run_split_ring(1, jobs(models, names, "auto", None), root / "one"),
        "alike": run_split_ring(2, jobs(models, names, "auto", [alike, alike]), root / "alike"),
        "pipeline": run_split_ring(
            2, jobs(models, names, "pipeline", one_to_three), root / "pipeline"
        ),
        "three": run_split_ring(3, jobs(models, SLIDING, "pipeline", three_unequal), root / "3"),
    }


def assert_answers_as_one_rank(run: dict[str, Any], one: dict[str, Any]) -> None:
    for name, result in run.items():
        assert "refused" not in result, (name, result)
        assert result["answers"] == one[name]["answers"], name
        # The follow-up reused the first turn: its prompt and answer but the last token.
        assert result["reused"] == one[name]["reused"] > len(PROMPTS[0].split()), name


def test_every_family_split_by_heads_answers_as_one_rank(runs: dict[str, Any]) -> None:
    alike = runs["alike"]
    for name, result in alike.items():
        expected = "pipeline" if name.split("-")[0] in RECURRENT else "tensor"
        assert result.get("layout") == expected, (name, result)
    assert_answers_as_one_rank(alike, runs["one"])


def test_every_family_split_by_layers_one_to_three_answers_as_one_rank(
    runs: dict[str, Any],
) -> None:
    pipeline = runs["pipeline"]
    for name, result in pipeline.items():
        assert result.get("layout") == "pipeline", (name, result)
        split = result["split"]
        assert sum(split) == 4 and split[0] > split[1], (name, split)  # rank 0 has 3× memory
    assert_answers_as_one_rank(pipeline, runs["one"])


def test_sliding_window_families_split_over_three_unequal_ranks_answer_as_one(
    runs: dict[str, Any],
) -> None:
    three = runs["three"]
    for name, result in three.items():
        assert result.get("layout") == "pipeline", (name, result)
        assert len(result["split"]) == 3 and result["split"][0] > result["split"][1], name
    assert_answers_as_one_rank(three, {name: runs["one"][name] for name in three})


def tensor_refusal(model: Path) -> str:
    """Why a tensor split of the model is refused, as start says it (the model's structure
    alone, no weight read)."""
    config = json.loads((model / "config.json").read_text())
    try:
        check_splittable(model, config, 2, "tensor", trust_remote_code=False)
    except SplitRefused as exc:
        return str(exc).split(": ", 1)[1].split(";")[0]
    return ""


def models_table(runs: dict[str, Any], models: dict[str, Path]) -> str:
    """docs/models.md's table, from the runs: how each variant splits over two ranks."""

    def cell(name: str, run: str, layout: str) -> str:
        result = runs[run][name]
        if result.get("layout") != layout:
            return f"refused: {tensor_refusal(models[name])}" if layout == "tensor" else "refused"
        return "exact" if result["answers"] == runs["one"][name]["answers"] else "DIFFERS"

    rows = ["| model | tensor (2 ranks) | pipeline (2 ranks, 1:3) |", "|---|---|---|"]
    for name in runs["one"]:
        rows.append(
            f"| {name} | {cell(name, 'alike', 'tensor')} | {cell(name, 'pipeline', 'pipeline')} |"
        )
    return "\n".join(rows) + "\n"


def test_docs_models_table_is_what_the_runs_give(
    runs: dict[str, Any], models: dict[str, Path]
) -> None:
    table = models_table(runs, models)
    if os.environ.get("RINGSERVE_WRITE_DOCS"):
        text = DOC.read_text()
        start, end = text.index("<!-- table -->\n"), text.index("<!-- /table -->")
        DOC.write_text(text[: start + len("<!-- table -->\n")] + table + text[end:])
    assert table in DOC.read_text(), f"docs/models.md is stale; the runs give:\n{table}"


def test_start_refuses_a_tensor_split_of_a_recurrent_hybrid_in_one_line(
    tmp_path: Path, models_dir: Path, models: dict[str, Path]
) -> None:
    lfm2 = models["lfm2"]
    env = ring_env(tmp_path / "run", models_dir, ranks=2, model=str(lfm2), parallel="tensor")
    code, line = refused(env, tmp_path / "run")
    assert code == ModelError.exit_code
    assert line.startswith(f"ringserve: model {lfm2} on ")
    assert line.endswith(
        ": lfm2 cannot be split by heads over 2 ranks: its layers keep a recurrent state "
        "(ArraysCache), which is not split by heads; use RINGSERVE_PARALLEL=pipeline (or auto)"
    )
