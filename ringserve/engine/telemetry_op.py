"""What each rank contributes to the telemetry op (gathered on rank 0 between requests)."""

from __future__ import annotations

import json
import os
import socket


def rank_report(rank: int) -> bytes:
    return json.dumps({"rank": rank, "hostname": socket.gethostname(), "pid": os.getpid()}).encode()
