"""The OpenAI-compatible HTTP API process. Restart it freely: it holds no model."""

from __future__ import annotations

import os
import sys

import uvicorn

from ringserve.api.app import create_app
from ringserve.cluster.state import RUN_ID_VAR
from ringserve.config.settings import load_settings
from ringserve.errors import RingserveError
from ringserve.logs import setup_logging


def main() -> int:
    try:
        settings = load_settings()
    except RingserveError as exc:
        print(f"ringserve: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(settings.log_level, "api")
    uvicorn.run(
        create_app(settings, os.environ.get(RUN_ID_VAR, "")),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
