import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from ringserve.model.demo import MARKER_NAME, build_demo_model, ensure_demo_model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_path(models_dir: Path) -> Path:
    return ensure_demo_model(models_dir, "tiny")


@pytest.fixture(scope="module")
def loaded(tiny_path: Path) -> tuple[Any, Any]:
    model, tokenizer = load(str(tiny_path))[:2]
    return model, tokenizer


def test_config_is_float32_qwen3_with_untied_embeddings(tiny_path: Path) -> None:
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["tie_word_embeddings"] is False
    weights = mx.load(str(tiny_path / "model.safetensors"))
    assert isinstance(weights, dict)
    assert all(w.dtype == mx.float32 for w in weights.values())
    index = json.loads((tiny_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)


def test_chat_template_writes_chatml(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, ring!"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nHello, ring!<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_any_utf8_round_trips(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    text = "Crème brûlée, naïve café 🚀🎉 你好，世界 — done."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_greedy_output_is_varied(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does the prefix cache do?"}],
        add_generation_prompt=True,
    )
    tokens = [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=32)]
    assert len(tokens) == 32
    assert len(set(tokens)) >= 8


def test_same_seed_gives_identical_files(tiny_path: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again", "tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_path / name).read_bytes(), name


def test_ensure_keeps_a_current_model_and_rebuilds_a_stale_one(
    tiny_path: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_path, models / tiny_path.name)
    weights = models / tiny_path.name / "model.safetensors"
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))

    assert ensure_demo_model(models, "tiny") == models / tiny_path.name
    assert weights.stat().st_mtime_ns == 1_000_000_000

    marker = models / tiny_path.name / MARKER_NAME
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 0}))
    ensure_demo_model(models, "tiny")
    assert weights.stat().st_mtime_ns != 1_000_000_000
    assert json.loads(marker.read_text())["format"] != 0
    assert weights.read_bytes() == (tiny_path / "model.safetensors").read_bytes()
