"""The shortest story: start a 2-rank ring, ask it something with the OpenAI SDK, stop it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ring import running_ring

pytestmark = pytest.mark.e2e


def test_a_started_ring_answers_and_stops_cleanly(tmp_path: Path, models_dir: Path) -> None:
    with running_ring(tmp_path / "run", models_dir) as ring:
        reply = ring.client().chat.completions.create(
            model="ringserve-tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.prompt_tokens > 0
        assert len(ring.state.ranks) == 2


def test_a_ring_started_by_mlx_launch_answers(tmp_path: Path, models_dir: Path) -> None:
    with running_ring(tmp_path / "run", models_dir, launcher="mlx") as ring:
        reply = ring.client().chat.completions.create(
            model="ringserve-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
