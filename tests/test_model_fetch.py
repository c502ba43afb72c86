"""A model the way a user points at one: a hub repo id served from a Hugging Face cache the test
lays out from the demo model (nothing is downloaded), and every way it can be wrong refused by
`start` with one line and its exit code before any process starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ringserve.errors import MemoryCheckError, ModelError, ModelUnavailableError
from ringserve.model.demo import ensure_demo_model
from ringserve.model.source import check_model_dir
from tests.hub_cache import cache_repo
from tests.hub_server import HubRepo, serving
from tests.ring import free_port, processes_of, refused, ring_env, started_ring

REPO = "test-org/tiny-chat"


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Path:
    return ensure_demo_model(models_dir, "tiny")


def hub_env(tmp_path: Path, models_dir: Path, model: str, **settings: str) -> dict[str, str]:
    """A 2-rank ring serving `model` from tmp_path/hub, offline."""
    env = ring_env(tmp_path / "run", models_dir, ranks=2, model=model, **settings)
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", COLUMNS="80")
    env.pop("HF_HOME", None)
    return env


def test_a_hub_id_is_served_from_the_cache_offline_and_named_as_written(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    snapshot = cache_repo(tiny, tmp_path / "hub", REPO)
    env = hub_env(tmp_path, models_dir, REPO)
    with started_ring(env, tmp_path / "run") as ring:
        assert f"model {REPO}: cached on" in ring.start_log
        assert f"revision {snapshot.name[:12]}" in ring.start_log
        with ring.http() as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [REPO]
            info = http.get("/model/info").json()
        assert info["model"] == REPO and info["model_path"] == str(snapshot)
        assert info["ranks"] == 2 and info["quantization"] is None
        reply = ring.client().chat.completions.create(
            model=REPO, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        # The ranks load the commit start checked, not whatever the revision names later.
        for rank in (p for p in ring.state.processes if p.rank is not None):
            environ = Path(f"/proc/{rank.pid}/environ").read_bytes().split(b"\0")
            assert f"RINGSERVE_MODEL_REVISION={snapshot.name}".encode() in environ

        listed = ring.launch("models").stdout
        row = next(line for line in listed.splitlines() if REPO in line)
        assert "*" in row and snapshot.name[:12] in row and "qwen3" in row and "main" in row
    assert not processes_of(tmp_path / "run")


def test_a_repo_missing_from_the_cache_offline_is_refused(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    cache_repo(tiny, tmp_path / "hub", REPO)
    code, line = refused(hub_env(tmp_path, models_dir, "test-org/absent"), tmp_path / "run")
    assert code == ModelUnavailableError.exit_code
    assert "model test-org/absent on " in line and "HF_HUB_OFFLINE is set" in line
    assert "unset HF_HUB_OFFLINE" in line


def test_a_cache_with_the_config_but_not_the_weights_is_refused(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    cache_repo(tiny, tmp_path / "hub", REPO, keep=lambda name: not name.endswith(".safetensors"))
    code, line = refused(hub_env(tmp_path, models_dir, REPO), tmp_path / "run")
    assert code == ModelUnavailableError.exit_code
    assert f"model {REPO} on " in line and "holds its other files but not model.safetensors" in line
    assert "HF_HUB_OFFLINE unset" in line


def test_an_architecture_mlx_lm_does_not_know_is_refused(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    model = tmp_path / "strange"
    shutil.copytree(tiny, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "strangeformer"}))
    cache_repo(model, tmp_path / "hub", REPO)
    code, line = refused(hub_env(tmp_path, models_dir, REPO), tmp_path / "run")
    assert code == ModelError.exit_code
    assert "model_type 'strangeformer' is not supported by mlx-lm" in line


def test_a_model_too_big_for_the_memory_is_refused_before_any_rank_starts(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    cache_repo(tiny, tmp_path / "hub", REPO)
    env = hub_env(tmp_path, models_dir, REPO, memory_budget="65536")
    code, line = refused(env, tmp_path / "run")
    assert code == MemoryCheckError.exit_code
    assert "has 0.1 MiB budgeted by RINGSERVE_MEMORY_BUDGET but needs" in line
    assert f"for 2 of 2 ranks of {REPO}" in line


def test_a_pipeline_the_whole_ring_cannot_hold_is_refused_before_any_rank_starts(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    # Under a pipeline the ranks split the model by their budgets once they have joined;
    # a ring that cannot hold it at all is refused first, before any weight is downloaded.
    cache_repo(tiny, tmp_path / "hub", REPO)
    env = hub_env(tmp_path, models_dir, REPO, memory_budget="65536", parallel="pipeline")
    code, line = refused(env, tmp_path / "run")
    assert code == MemoryCheckError.exit_code
    assert f"model {REPO} needs" in line and "but the ring's hosts hold 0.1 MiB together" in line


def test_a_directory_is_checked_before_any_rank_starts(tmp_path: Path, tiny: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    assert check_model_dir(model, "m", "h", ranks=2).model_type == "qwen3"
    heads = r"model m on h: qwen3 cannot be split by heads over 3 ranks: its num_attention_heads="
    with pytest.raises(ModelError, match=heads):
        check_model_dir(model, "m", "h", ranks=3)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"model m on h: .* has no tokenizer"):
        check_model_dir(model, "m", "h", ranks=2)
    (model / "config.json").unlink()
    with pytest.raises(ModelError, match=r"has no config\.json; point RINGSERVE_MODEL at"):
        check_model_dir(model, "m", "h", ranks=2)


def online_env(tmp_path: Path, models_dir: Path, endpoint: str, **settings: str) -> dict[str, str]:
    """A 2-rank ring serving REPO from the hub at `endpoint` into an empty cache."""
    env = hub_env(tmp_path, models_dir, REPO, **settings)
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_TOKEN", None)
    env["HF_ENDPOINT"] = endpoint
    return env


def test_a_hub_model_is_downloaded_with_progress_before_the_ranks_start_then_found_cached(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    repo = HubRepo.from_dir(REPO, tiny, chunk_delay_s=0.02)
    weights = f"GET /{REPO}/resolve/{repo.commit}/model.safetensors"
    with serving(repo) as endpoint:
        env = online_env(tmp_path, models_dir, endpoint)
        with started_ring(env, tmp_path / "run") as ring:
            log = " ".join(ring.start_log.split())
            assert f"model {REPO}: downloaded 2.5 MiB of weights (1 file(s)) to " in log, log
            assert "2.6/2.6 MB" in log  # the progress bar, at its end
            assert repo.requests.count(weights) == 1
            with ring.http() as http:
                assert http.get("/v1/models").json()["data"][0]["id"] == REPO
            ring.launch("stop")
            again = ring.launch("start").stderr
            assert f"model {REPO}: cached on " in again and "downloaded 2" not in again
            assert repo.requests.count(weights) == 1


@pytest.mark.parametrize(
    ("model", "settings", "expected"),
    [
        ("test-org/absent", {}, "no such repo on the hub, or it is private and needs a token"),
        (REPO, {"model_revision": "v9"}, "revision 'v9' does not exist in the repo"),
    ],
)
def test_what_the_hub_refuses_is_one_line(
    tmp_path: Path,
    models_dir: Path,
    tiny: Path,
    model: str,
    settings: dict[str, str],
    expected: str,
) -> None:
    with serving(HubRepo.from_dir(REPO, tiny)) as endpoint:
        env = online_env(tmp_path, models_dir, endpoint, **settings)
        env["RINGSERVE_MODEL"] = model
        code, line = refused(env, tmp_path / "run")
    assert code == ModelUnavailableError.exit_code
    assert f"model {model} on " in line and expected in line


def test_a_hub_that_cannot_be_reached_is_one_line(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, line = refused(online_env(tmp_path, models_dir, closed), tmp_path / "run")
    assert code == ModelUnavailableError.exit_code
    assert f"model {REPO} on " in line and f"cannot reach the hub at {closed}" in line
    assert "HF_HUB_OFFLINE=1" in line


def test_a_directory_whose_heads_do_not_divide_by_the_ranks_is_refused_before_they_start(
    tmp_path: Path, models_dir: Path, tiny: Path
) -> None:
    # Under tensor (auto would make it a pipeline of whole layers, which needs no dividing).
    env = ring_env(tmp_path / "run", models_dir, ranks=3, model=str(tiny), parallel="tensor")
    code, line = refused(env, tmp_path / "run")
    assert code == ModelError.exit_code
    assert f"model {tiny} on " in line
    assert "cannot be split by heads over 3 ranks: its num_attention_heads=8 does not" in line
