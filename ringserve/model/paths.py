"""Which model to serve: the configured one, or the built-in demo model when none is set."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ringserve.config.settings import Settings
from ringserve.model.source import looks_like_hub_id


def configured_model(settings: Settings) -> str:
    """RINGSERVE_MODEL as the ranks get it: a hub repo id as written, a directory made absolute."""
    if looks_like_hub_id(settings.model):
        return settings.model
    return str(Path(settings.model).expanduser().resolve())


def resolve_model(settings: Settings) -> str:
    """The directory a rank loads: the configured one, a hub model's snapshot in this host's
    cache (`launch.py start` fetched it before the ranks started; never downloaded here), or
    the demo model (built once) when MODEL is empty."""
    if settings.model:
        if looks_like_hub_id(settings.model):
            from ringserve.model.hub import cached_snapshot

            revision = settings.model_revision or None
            return str(cached_snapshot(settings.model, revision, socket.gethostname()))
        return configured_model(settings)
    from ringserve.model.demo import ensure_demo_model

    return str(ensure_demo_model(settings.models_dir, settings.demo_size))


def served_model_id(settings: Settings, model_path: str) -> str:
    """What /v1/models calls the model: a hub repo id as the user wrote it, else the
    directory's name."""
    if settings.model and looks_like_hub_id(settings.model):
        return settings.model
    return os.path.basename(model_path.rstrip("/"))
