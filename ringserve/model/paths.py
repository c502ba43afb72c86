"""Which model to serve: the configured one, or the built-in demo model when none is set."""

from __future__ import annotations

from pathlib import Path

from ringserve.config.settings import Settings


def resolve_model(settings: Settings) -> str:
    """A local path or a hub repo id; builds the demo model (once) when MODEL is empty."""
    if settings.model:
        local = Path(settings.model).expanduser()
        return str(local.resolve()) if local.exists() else settings.model
    from ringserve.model.demo import ensure_demo_model

    return str(ensure_demo_model(settings.models_dir, settings.demo_size))
