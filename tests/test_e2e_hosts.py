"""A ring across two hosts: the launcher runs on host A, pushes to host B over SSH, starts rank 0
on A and rank 1 on B (the ring runs over the veth addresses), watches and stops both."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from ringserve.distributed.layer_split import model_sizes, pipeline_split
from ringserve.model.demo import ensure_demo_model
from tests.netns import NetnsCluster
from tests.ring import (
    MKL_EXPECTED,
    Ring,
    launch,
    mapped,
    no_eos,
    ring_env,
    running_ring,
    started_ring,
    stop_and_check,
)

pytestmark = [pytest.mark.netns, pytest.mark.e2e]


def hosts_env(
    cluster: NetnsCluster,
    run_dir: Path,
    models_dir: Path,
    known_hosts: Path | None = None,
    **host_b: str,
) -> dict[str, str]:
    """Settings for a ring of A (this machine, rank 0) and B, with B's entry overridable."""
    b = {
        "host": cluster.b.address,
        "user": "root",
        "key_file": str(cluster.client_key),
        "workdir": str(cluster.b.workdir),
        "python": sys.executable,
        **host_b,
    }
    env = ring_env(
        run_dir,
        models_dir,
        hosts=json.dumps([{"host": cluster.a.address}, b]),
        ssh_known_hosts=str(known_hosts or cluster.known_hosts),
        ssh_connect_timeout="3",
    )
    env["COLUMNS"] = "250"  # one line per table row in `status`
    return env


def chat(http: httpx.Client) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    return http.post("/v1/chat/completions", json=body, timeout=10)


def ringserve_processes(cluster: NetnsCluster, run_dir: Path) -> list[int]:
    """Processes of this run on either host: local ones carry its run dir, remote ones run in
    B's project copy."""
    marker = f"RINGSERVE_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cwd == cluster.b.workdir or marker in environ:
            found.append(int(entry.name))
    return found


def test_a_ring_across_two_hosts_answers_and_restarts_pushing_nothing_new(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path
) -> None:
    cluster = netns_on_a
    known_hosts = tmp_path / "known_hosts"  # B's key is new: trusted on first use here
    env = hosts_env(cluster, tmp_path / "run", models_dir, known_hosts)
    env["RINGSERVE_SSH_TRUST_NEW_HOSTS"] = "true"
    with started_ring(env, tmp_path / "run") as ring:
        reply = ring.client().chat.completions.create(
            model="ringserve-tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert cluster.b.address in known_hosts.read_text()

        rank0, rank1 = ring.state.ranks
        assert rank0.remote is None
        assert rank1.remote is not None and rank1.remote.host == cluster.b.address
        assert Path(os.readlink(f"/proc/{rank1.pid}/cwd")) == cluster.b.workdir
        hostfile = json.loads((ring.run_dir / "hosts.json").read_text())
        assert [h["ips"] for h in hostfile["hosts"]] == [[cluster.a.address], [cluster.b.address]]
        status = ring.launch("status")
        rows = [line for line in status.stdout.splitlines() if "│ rank 1 " in line]
        assert len(rows) == 1 and f"root@{cluster.b.address}" in rows[0]
        assert str(rank1.pid) in rows[0] and "yes" in rows[0] and "MiB" in rows[0]
        remote_log = ring.launch("logs", "1").stdout  # read over SSH
        assert "rank 1 of 2 ready" in remote_log
        if MKL_EXPECTED:  # the remote rank computes with MKL too
            assert [f for f in mapped(rank1.pid) if Path(f).name.startswith("libmkl_rt")]
            assert "CPU BLAS: MKL" in remote_log

        first = ring.pids()
        ring.launch("stop")
        assert not ringserve_processes(cluster, ring.run_dir), f"left after stop of {first}"

        again = ring.launch("start")
        assert f"root@{cluster.b.address}: pushed 0 of" in again.stderr
        with ring.http() as http:
            assert chat(http).status_code == 200
    assert not ringserve_processes(cluster, ring.run_dir)


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("unreachable", "root@10.213.7.3: unreachable"),
        ("wrong key", "root@10.213.7.2: authentication failed with key"),
        ("unknown host key", "root@10.213.7.2: host key unknown"),
    ],
)
def test_a_host_that_cannot_be_used_stops_the_start_before_anything_runs(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path, problem: str, expected: str
) -> None:
    cluster = netns_on_a
    run_dir = tmp_path / "run"
    if problem == "unreachable":
        env = hosts_env(cluster, run_dir, models_dir, host=cluster.silent_address)
    elif problem == "wrong key":
        env = hosts_env(cluster, run_dir, models_dir, key_file=str(cluster.wrong_key))
    else:
        (tmp_path / "empty_known_hosts").touch()
        env = hosts_env(cluster, run_dir, models_dir, tmp_path / "empty_known_hosts")
    try:
        result = launch(env, "start", check=False)
        assert result.returncode != 0
        message = " ".join(result.stderr.split())
        assert expected in message and "nothing was started" in message
        assert not (run_dir / "state.json").exists()
        assert not ringserve_processes(cluster, run_dir)
    finally:
        stop_and_check(Ring(env=env, run_dir=run_dir))


def test_two_unequal_hosts_serve_a_pipeline_split_by_their_budgets(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path
) -> None:
    model = ensure_demo_model(models_dir, "tiny-deep")
    env = hosts_env(netns_on_a, tmp_path / "run", models_dir)
    hosts = json.loads(env["RINGSERVE_HOSTS"])
    budgets = [12_000_000, 4_000_000]  # A (rank 0) has three times B's memory
    for host, budget in zip(hosts, budgets, strict=True):
        host["memory_budget"] = budget
    env.update(RINGSERVE_HOSTS=json.dumps(hosts), RINGSERVE_DEMO_SIZE="tiny-deep")
    body = {
        "prompt": ["The ring of machines", "def add(a, b):"],
        "max_tokens": 16,
        "temperature": 0,
        "logit_bias": no_eos(model),
    }
    one = running_ring(tmp_path / "one", models_dir, ranks=1, demo_size="tiny-deep")
    with one as reference, reference.http() as http:
        expected = http.post("/v1/completions", json=body).json()["choices"]
    with started_ring(env, tmp_path / "run") as ring, ring.http() as http:
        info = http.get("/model/info").json()
        split = pipeline_split(model_sizes(model, 8), budgets)
        assert info["parallel"] == "pipeline"  # auto: the hosts' budgets differ
        assert [s["layers"][1] - s["layers"][0] for s in info["split"]] == split
        assert http.post("/v1/completions", json=body).json()["choices"] == expected
