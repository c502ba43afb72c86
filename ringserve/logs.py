"""One logging format for every process of the project."""

from __future__ import annotations

import logging


def setup_logging(level: str, who: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
