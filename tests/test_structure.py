"""What decoding may be held to: schemas past the bounds are refused before anything compiles,
a grammar whose first steps fail or crawl is refused by rank 0's trial, a compiled grammar is
kept and each sequence gets its own copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from ringserve.engine import structure
from ringserve.engine.structure import GrammarProcessor, Grammars, grammar, json_answer
from ringserve.errors import GenerationError
from ringserve.model.demo import ensure_demo_model


@pytest.fixture(scope="module")
def grammars(models_dir: Path) -> Grammars:
    return Grammars(load_tokenizer(ensure_demo_model(models_dir, "tiny")))


def refusal(grammars: Grammars, schema: dict[str, Any]) -> str:
    with pytest.raises(GenerationError) as refused:
        grammars.check(grammar(json_answer(schema)))
    assert refused.value.status == 400 and refused.value.code == "invalid_format"
    return str(refused.value)


def objects(count: int, required: bool = False) -> dict[str, Any]:
    properties = {f"p{i}": {"type": "integer"} for i in range(count)}
    named = list(properties) if required else []
    return {"type": "object", "properties": properties, "required": named}


def test_schemas_past_the_bounds_are_refused_naming_them(grammars: Grammars) -> None:
    assert "8000 object properties; at most 5000" in refusal(grammars, objects(8000, True))
    assert "2000 optional properties; at most 450" in refusal(grammars, objects(2000))
    enum = {"type": "string", "enum": [f"v{i}" for i in range(1500)]}
    assert "1500 enum and const values; at most 1000" in refusal(grammars, enum)
    pattern = {"type": "string", "pattern": "^(={128}){3000}\\*$"}
    assert "repeats to 384001 characters" in refusal(grammars, pattern)
    # Inside a tool's parameters too.
    with pytest.raises(GenerationError, match="repeats to 384001"):
        structure.tool_answer(
            [{"function": {"name": "f", "parameters": {"properties": {"x": pattern}}}}],
            structure.ToolFormat('"<a>"', '"</a>"'),
            several=False,
        )


def test_schemas_within_the_bounds_compile(grammars: Grammars) -> None:
    grammars.check(grammar(json_answer(objects(3000, True))))
    grammars.check(grammar(json_answer({"type": "string", "pattern": "^(={128}){30}\\*$"})))
    # A malformed schema is llguidance's clear 400, never a crash of the bound's walk.
    odd = {"type": "object", "required": [{"not": "a name"}]}
    assert "Expected string for 'required' item" in refusal(grammars, odd)


def test_a_grammar_whose_first_steps_are_too_slow_is_refused(
    grammars: Grammars, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(structure, "MAX_TRIAL_S", 0.0)
    assert "a token to enforce (at most 0.0 s)" in refusal(grammars, {"type": "object"})


def test_a_compiled_grammar_is_kept_and_each_sequence_gets_a_fresh_copy(
    grammars: Grammars,
) -> None:
    compiled = grammar(json_answer({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert grammars._compiled_matcher(compiled) is grammars._compiled_matcher(compiled)
    first, second = grammars.processor(compiled), grammars.processor(compiled)
    assert isinstance(first, GrammarProcessor) and isinstance(second, GrammarProcessor)
    start = second.matcher.compute_bitmask()
    allowed = np.unpackbits(np.frombuffer(start, dtype=np.uint8), bitorder="little")
    first.matcher.consume_token(int(np.flatnonzero(allowed)[0]))
    assert first.matcher.compute_bitmask() != start
    assert second.matcher.compute_bitmask() == start
