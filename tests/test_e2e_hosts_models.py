"""A hub model on a ring of two hosts, each with its own Hugging Face cache: checked on both
before anything starts, downloaded once (by host A, which launches) and copied to B over its SSH
connection; or, for a host told to fetch for itself, downloaded by B on its own side (over its
SSH session, with its progress shown here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringserve.errors import ModelUnavailableError
from ringserve.model.demo import ensure_demo_model
from tests.hub_cache import cache_repo
from tests.hub_server import HubRepo, serving
from tests.netns import NetnsCluster
from tests.ring import Ring, launch, started_ring, stop_and_check
from tests.test_e2e_hosts import hosts_env, ringserve_processes

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
REPO = "test-org/tiny-chat"


def two_caches_env(
    cluster: NetnsCluster, tmp_path: Path, models_dir: Path, **environment: str
) -> dict[str, str]:
    """Host A's cache in tmp_path/a-hf, host B's in tmp_path/b-hf (its `hf_home`)."""
    env = hosts_env(cluster, tmp_path / "run", models_dir, hf_home=str(tmp_path / "b-hf"))
    env.update(RINGSERVE_MODEL=REPO, HF_HOME=str(tmp_path / "a-hf"), **environment)
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        if name not in environment:
            env.pop(name, None)
    return env


def test_the_hub_sends_the_model_once_and_b_gets_a_copy_unless_told_to_fetch_it_itself(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path
) -> None:
    cluster = netns_on_a
    model = ensure_demo_model(models_dir, "tiny")
    repo = HubRepo.from_dir(REPO, model, chunk_delay_s=0.01)
    b = f"root@{cluster.b.address}"
    weights = (model / "model.safetensors").stat().st_size
    with serving(repo, host=cluster.a.address) as endpoint:
        env = two_caches_env(cluster, tmp_path, models_dir, HF_ENDPOINT=endpoint)
        with started_ring(env, tmp_path / "run") as ring:
            log = " ".join(ring.start_log.split())
            assert "downloaded 2.5 MiB of weights (1 file(s)) to" in log, log
            assert f"to {b} in" in log and "copied" in log, log
            # One copy of the model left the hub, whatever the ring's size.
            assert repo.sent["model.safetensors"] == weights, repo.sent
            assert all(repo.sent[name] == len(repo.files[name]) for name in repo.sent)
            for cache in ("a-hf", "b-hf"):
                assert list((tmp_path / cache / "hub").glob("models--*/snapshots/*/*.safetensors"))
            with ring.http() as http:
                assert http.get("/v1/models").json()["data"][0]["id"] == REPO
                body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            ring.launch("stop")

            # Told to fetch for itself, B downloads its own copy (a second one from the hub).
            hosts = json.loads(env["RINGSERVE_HOSTS"])
            hosts[1].update(fetch="hub", hf_home=str(tmp_path / "b2-hf"))
            ring.env["RINGSERVE_HOSTS"] = json.dumps(hosts)
            again = " ".join(ring.launch("start").stderr.split())
            assert f"downloaded 2.5 MiB of weights (1 file(s)) to {b} in" in again, again
            assert "copied" not in again
            assert repo.sent["model.safetensors"] == 2 * weights
            assert list((tmp_path / "b2-hf" / "hub").glob("models--*/snapshots/*/*.safetensors"))
    assert not ringserve_processes(cluster, tmp_path / "run")


def test_a_host_told_to_fetch_for_itself_offline_without_the_model_is_named_and_nothing_starts(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path
) -> None:
    cluster = netns_on_a
    cache_repo(ensure_demo_model(models_dir, "tiny"), tmp_path / "a-hf" / "hub", REPO)
    env = two_caches_env(cluster, tmp_path, models_dir, HF_HUB_OFFLINE="1")
    hosts = json.loads(env["RINGSERVE_HOSTS"])
    hosts[1]["fetch"] = "hub"
    env["RINGSERVE_HOSTS"] = json.dumps(hosts)
    run_dir = tmp_path / "run"
    try:
        result = launch(env, "start", check=False)
        assert result.returncode == ModelUnavailableError.exit_code, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("ringserve:")]
        assert len(lines) == 1, result.stderr
        assert (
            f"model {REPO} on root@{cluster.b.address}: not in the Hugging Face cache" in lines[0]
        )
        assert str(tmp_path / "b-hf") in lines[0]
        assert not (run_dir / "state.json").exists()
        assert not ringserve_processes(cluster, run_dir)
    finally:
        stop_and_check(Ring(env=env, run_dir=run_dir))
