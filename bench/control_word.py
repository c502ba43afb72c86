"""Cost of the per-step control word: one header `all_sum` between 2 ranks on a real ring.

    .venv/bin/python bench/control_word.py [--exchanges 2000]

Starts two rank processes on 127.0.0.1 (ring backend), each timing back-to-back header
exchanges on the generation stream, as the lockstep loop does once per generated token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rank_main(exchanges: int) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    from ringserve.distributed.protocol import Collectives, Header, Op

    group = mx.distributed.init(backend="ring", strict=True)
    collectives = Collectives(group, generation_stream)
    for _ in range(50):
        collectives.exchange_header(Header(Op.STEP))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    for _ in range(exchanges):
        collectives.exchange_header(Header(Op.STEP))
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    print(
        json.dumps(
            {
                "rank": group.rank(),
                "wall_us": 1e6 * wall / exchanges,
                "cpu_us": 1e6 * cpu / exchanges,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exchanges", type=int, default=2000)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.exchanges)
        return
    port = 42000 + os.getpid() % 1000
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as hostfile:
        json.dump([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]], hostfile)
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", "--exchanges", str(args.exchanges)],
            env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile.name},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for process in ranks:
        out, _ = process.communicate(timeout=300)
        print(out.strip())
    os.unlink(hostfile.name)


if __name__ == "__main__":
    main()
