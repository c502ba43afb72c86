"""What shows other keys' activity (prefix-cache counters move with every key's prompts): only
admin keys see it, wherever the ring's facts are shown."""

from __future__ import annotations

from typing import Any

ACTIVITY = frozenset({"prefix_cache"})


def visible(facts: dict[str, Any], admin: bool) -> dict[str, Any]:
    """`facts` (the model's info, or a rank's report) as a key may see them."""
    return facts if admin else {k: v for k, v in facts.items() if k not in ACTIVITY}
