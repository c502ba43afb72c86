"""Real MLX rings of local processes for the split tests: every rank runs tests/split_worker.py
over the same list of models (see there); rank 0's results come back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.ring import PROJECT_DIR, free_port

RING_TIMEOUT_S = 600


def run_split_ring(world_size: int, jobs: list[dict[str, Any]], work_dir: Path) -> dict[str, Any]:
    """Serve `jobs` on a ring of `world_size` processes; each job's result by name."""
    work_dir.mkdir(parents=True, exist_ok=True)
    jobs_file, results_file = work_dir / "jobs.json", work_dir / "results.json"
    jobs_file.write_text(json.dumps({"world_size": world_size, "jobs": jobs}))
    base = free_port(world_size)
    hostfile = work_dir / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(world_size)]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "RINGSERVE_"))}
    ranks = []
    for rank in range(world_size):
        mlx_env = {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)} if world_size > 1 else {}
        log = (work_dir / f"rank{rank}.log").open("wb")
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.split_worker", str(jobs_file), str(results_file)],
                cwd=PROJECT_DIR,
                env={**env, **mlx_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped below if it hangs
            )
        )
        log.close()
    try:
        codes = [process.wait(RING_TIMEOUT_S) for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    logs = "\n".join((work_dir / f"rank{r}.log").read_text()[-3000:] for r in range(world_size))
    assert codes == [0] * world_size, f"a rank failed ({codes}):\n{logs}"
    results: dict[str, Any] = json.loads(results_file.read_text())
    return results
