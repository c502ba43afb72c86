"""The OpenAI-compatible HTTP API process. Restart it freely: it holds no model."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from ringserve.api.app import create_app
from ringserve.api.connections import bounded_protocol, connection_budget, raise_descriptor_limit
from ringserve.cluster.state import RUN_ID_VAR
from ringserve.config.settings import exposure_warning, load_settings
from ringserve.errors import RingserveError
from ringserve.logs import setup_logging

log = logging.getLogger("ringserve.api")


def main() -> int:
    try:
        settings = load_settings()
    except RingserveError as exc:
        print(f"ringserve: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(settings.log_level, "api")
    descriptors = raise_descriptor_limit()
    connections = connection_budget(settings.api_max_connections, descriptors)
    log.info("up to %d connections at once (%d open files allowed)", connections, descriptors)
    warning = exposure_warning(settings)
    if warning is not None:
        log.warning("%s", warning)
    uvicorn.run(
        create_app(settings, os.environ.get(RUN_ID_VAR, "")),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
        log_config=None,  # uvicorn's lines go through the process's own logging
        http=bounded_protocol(connections, settings.api_read_timeout),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
