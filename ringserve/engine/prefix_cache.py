"""Per-rank KV prefix cache (decisions from broadcast token ids only, so every rank agrees)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache


class PrefixCache:
    def __init__(self, model: nn.Module, budget_tokens: int = 0) -> None:
        self.model = model
        self.budget_tokens = budget_tokens

    def checkout(
        self, tokens: Sequence[int], conversation_id: str | None
    ) -> tuple[list[int], list[Any], int]:
        """The tokens still to prefill, a cache to generate into, and how many were reused."""
        return list(tokens), make_prompt_cache(self.model), 0

    def checkin(
        self,
        prompt: Sequence[int],
        generated: Sequence[int],
        cache: list[Any],
        conversation_id: str | None,
        complete: bool,
    ) -> None:
        """Offer a finished request's cache for reuse."""

    def stats(self) -> dict[str, int]:
        return {}
