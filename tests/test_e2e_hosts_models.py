"""A hub model on a ring of two hosts, each with its own Hugging Face cache: checked on both
before anything starts, fetched by each host on its own side (host B over its SSH session, with
its progress shown here), and found cached the second time."""

from __future__ import annotations

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


def test_each_host_fetches_the_model_into_its_own_cache_then_finds_it_there(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path
) -> None:
    cluster = netns_on_a
    repo = HubRepo.from_dir(REPO, ensure_demo_model(models_dir, "tiny"), chunk_delay_s=0.01)
    b = f"root@{cluster.b.address}"
    with serving(repo, host=cluster.a.address) as endpoint:
        env = two_caches_env(cluster, tmp_path, models_dir, HF_ENDPOINT=endpoint)
        with started_ring(env, tmp_path / "run") as ring:
            log = " ".join(ring.start_log.split())
            assert f"downloaded 2.5 MiB of weights (1 file(s)) to {b} in" in log, log
            assert log.count(f"model {REPO}: downloaded") == 2
            for cache in ("a-hf", "b-hf"):
                assert list((tmp_path / cache / "hub").glob("models--*/snapshots/*/*.safetensors"))
            with ring.http() as http:
                assert http.get("/v1/models").json()["data"][0]["id"] == REPO
                body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            ring.launch("stop")
            again = " ".join(ring.launch("start").stderr.split())
            assert f"model {REPO}: cached on {b} (2.5 MiB of weights" in again
            assert "downloaded 2" not in again
    assert not ringserve_processes(cluster, tmp_path / "run")


def test_a_host_whose_cache_lacks_the_model_offline_is_named_and_nothing_starts(
    netns_on_a: NetnsCluster, tmp_path: Path, models_dir: Path
) -> None:
    cluster = netns_on_a
    cache_repo(ensure_demo_model(models_dir, "tiny"), tmp_path / "a-hf" / "hub", REPO)
    env = two_caches_env(cluster, tmp_path, models_dir, HF_HUB_OFFLINE="1")
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
