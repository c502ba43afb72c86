"""Planning the rank processes of a two-host ring."""

from __future__ import annotations

import json
from pathlib import Path

from ringserve.cluster.hosts import rank_placements
from ringserve.cluster.ranks import plan_ranks
from ringserve.config.settings import HostSpec, Settings


def test_local_ranks_run_here_and_remote_ranks_from_the_pushed_copy(tmp_path: Path) -> None:
    settings = Settings(
        hosts=(
            HostSpec(host="10.0.0.1"),
            HostSpec(host="10.0.0.2", python="/opt/venv/bin/python", ranks=2),
        ),
        run_dir=tmp_path / "run",
        remote_workdir="serve",
    )
    plans = plan_ranks(
        settings,
        rank_placements(settings, local_index=0),
        extra_env={"RINGSERVE_LOG_LEVEL": "DEBUG"},
        project_dir=tmp_path,
        local_python="/here/python",
    )

    here, there = plans[0].launch, plans[2].launch
    assert (here.argv, here.cwd) == (("/here/python", "server.py"), str(tmp_path))
    assert here.log_path == str(tmp_path / "run" / "rank0.log")
    assert (there.argv, there.cwd, there.host) == (
        ("/opt/venv/bin/python", "server.py"),
        "serve",
        "10.0.0.2",
    )
    assert there.pid_path == "serve/.ringserve/run/rank2.pid"
    assert there.env == {
        "RINGSERVE_LOG_LEVEL": "DEBUG",
        "_RINGSERVE_CPU_SLICE": "1/2",  # the second of the two ranks on 10.0.0.2
        "MLX_RANK": "2",
        "MLX_HOSTFILE": ".ringserve/run/rank2.mlx_hostfile.json",  # the rank runs in serve/
    }
    assert "_RINGSERVE_CPU_SLICE" not in here.env  # alone on its host: nothing to share
    ring = json.loads(plans[2].files["serve/.ringserve/run/rank2.mlx_hostfile.json"])
    assert ring == [["10.0.0.1:32323"], ["10.0.0.2:32324"], ["10.0.0.2:32325"]]
