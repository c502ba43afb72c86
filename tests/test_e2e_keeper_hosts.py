"""The keeper across hosts: A (this machine, ranks 0 and 1) and B (rank 2) in network
namespaces. A rank killed on B is started again there; when B also cannot be reached any more
(its sshd gone), B has failed twice: it is left out and the model is split again over A's two
ranks, as a pipeline."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringserve.cluster.local import pid_alive
from ringserve.model.demo import ensure_demo_model
from tests.netns import NetnsCluster, inside_namespace, start_sshd, stop_sshd
from tests.ring import Ring, started_ring
from tests.test_e2e_hosts import hosts_env

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

SERVING_AGAIN_S = 90


@pytest.fixture(scope="module")
def ring(
    netns_cluster: NetnsCluster, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[Ring]:
    """A 3-rank ring of the 8-layer demo model: it splits as a pipeline over 3 ranks or 2."""
    ensure_demo_model(models_dir, "tiny-deep")
    run = tmp_path_factory.mktemp("kept-hosts") / "run"
    with inside_namespace(netns_cluster.a.namespace):  # the test runs as host A
        env = hosts_env(netns_cluster, run, models_dir)
        hosts = json.loads(env["RINGSERVE_HOSTS"])
        hosts[0]["ranks"] = 2
        env.update(RINGSERVE_HOSTS=json.dumps(hosts), RINGSERVE_DEMO_SIZE="tiny-deep")
        env.update(RINGSERVE_HOST_FAILURE_LIMIT="2")
        with started_ring(env, run) as ring:
            yield ring


def model_info(ring: Ring) -> dict[str, Any]:
    with ring.http() as http:
        reply = http.get("/model/info", timeout=10)
    assert reply.status_code == 200, reply.text
    info: dict[str, Any] = reply.json()
    return info


def serves(ring: Ring) -> bool:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with ring.http() as http:
        return (
            http.post("/v1/chat/completions", json=body, timeout=SERVING_AGAIN_S).status_code == 200
        )


def restarted(ring: Ring, count: int) -> bool:
    deadline = time.monotonic() + SERVING_AGAIN_S
    while time.monotonic() < deadline:
        restarts = model_info_or_none(ring)
        if restarts is not None and restarts["count"] >= count and not restarts["restarting"]:
            return True
        time.sleep(0.5)
    return False


def model_info_or_none(ring: Ring) -> dict[str, Any] | None:
    with ring.http() as http:
        reply = http.get("/model/info", timeout=10)
    return reply.json()["restarts"] if reply.status_code == 200 else None


def test_a_rank_killed_on_a_remote_host_is_started_again_there(
    ring: Ring, netns_cluster: NetnsCluster
) -> None:
    before = model_info(ring)["restarts"]["count"]
    remote = ring.state.ranks[2]
    assert remote.remote is not None and remote.remote.host == netns_cluster.b.address
    os.kill(remote.pid, signal.SIGKILL)  # the hosts share this machine's PID space
    assert serves(ring)  # held through the restart, then answered
    assert restarted(ring, before + 1)
    again = ring.state.ranks[2]
    assert again.remote == remote.remote and again.pid != remote.pid and pid_alive(again.pid)
    restarts = model_info(ring)["restarts"]
    assert f"rank 2 (pid {remote.pid} on root@{netns_cluster.b.address}) died" in str(restarts)
    assert restarts["hosts_left_out"] == []


def test_a_host_that_fails_again_is_left_out_and_the_model_split_over_the_rest(
    ring: Ring, netns_cluster: NetnsCluster
) -> None:
    before = model_info(ring)["restarts"]["count"]
    b = netns_cluster.b
    remote = ring.state.ranks[2]
    stop_sshd(b)  # B can no longer be reached over SSH...
    try:
        os.kill(remote.pid, signal.SIGKILL)  # ...and its rank is gone
        assert serves(ring)
        assert restarted(ring, before + 1)
        info = model_info(ring)
        label = f"root@{b.address}"
        assert info["restarts"]["hosts_left_out"] == [label], info["restarts"]
        assert info["ranks"] == 2 and info["parallel"] == "pipeline"
        assert sum(s["layers"][1] - s["layers"][0] for s in info["split"]) == 8
        assert all(p.remote is None for p in ring.state.ranks)
        status = " ".join(ring.launch("status").stdout.split())
        assert f"hosts left out: {label}" in status
    finally:
        start_sshd(b, netns_cluster.root / "authorized_keys")
