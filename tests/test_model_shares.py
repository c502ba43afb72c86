"""What each host of a ring needs of a hub model, where it comes from, and a host's cache taking
copied files in: the launcher's decisions as pure functions, and the cache on real files (the
lookups are huggingface_hub's own)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import pytest
from huggingface_hub import constants, snapshot_download

from ringserve.cluster.hosts import rank_placements
from ringserve.cluster.model_copy import Endpoint, LocalFiles, OriginBroken, copy_file, receive
from ringserve.cluster.model_plan import choose_origin, plan_shares, still_needed, wanted_files
from ringserve.config.settings import load_settings
from ringserve.distributed.layer_files import FileLayers, file_layers, files_for
from ringserve.distributed.layer_split import ModelSizes
from ringserve.errors import ModelUnavailableError
from ringserve.model import store
from ringserve.model.prepare import Prepared
from ringserve.model.store import CachedFile, Holding
from ringserve.platform.preflight import HostMemory
from tests.hub_cache import hub_etag
from tests.ring import PROJECT_DIR

MIB = 1 << 20
Source = Literal["directory", "cache", "hub", "copy"]
REPO = "org/m"
COMMIT = "c" * 40
# Four layers in three files; layer 1 straddles the first two; the head is in the last.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model-1.safetensors",
    "model.layers.0.mlp.weight": "model-1.safetensors",
    "model.layers.1.attn.weight": "model-1.safetensors",
    "model.layers.1.mlp.weight": "model-2.safetensors",
    "model.layers.2.mlp.weight": "model-2.safetensors",
    "model.layers.3.mlp.weight": "model-3.safetensors",
    "model.norm.weight": "model-3.safetensors",
    "model.layers.4.mtp.weight": "model-4.safetensors",  # past the model's 4 layers
}
FILES = ["model-1.safetensors", "model-2.safetensors", "model-3.safetensors", "model-4.safetensors"]


def test_each_file_knows_its_layers_and_a_rank_needs_the_files_of_its_own() -> None:
    layers = file_layers(FILES, WEIGHT_MAP, num_layers=4)
    assert layers["model-1.safetensors"] == FileLayers(frozenset({0, 1}), shared=True)
    assert layers["model-2.safetensors"] == FileLayers(frozenset({1, 2}), shared=False)
    assert layers["model-4.safetensors"] == FileLayers(frozenset(), shared=False)
    # Layers 2-3: the file holding 2 (and part of 1), the last, and the embedding's.
    assert files_for(layers, range(2, 4)) == {
        "model-1.safetensors",
        "model-2.safetensors",
        "model-3.safetensors",
    }
    assert files_for(layers, range(0, 1)) == {"model-1.safetensors", "model-3.safetensors"}
    assert files_for(layers, None) == set(FILES)
    # Without an index nothing says where the layers are: every file is every rank's.
    assert files_for(file_layers(["model.safetensors"], None, 4), range(0, 1)) == {
        "model.safetensors"
    }


def two_hosts(parallel: str = "pipeline", **first: object) -> object:
    hosts = [{"host": "127.0.0.1", **first}, {"host": "10.0.0.2"}]
    return load_settings(
        PROJECT_DIR / "absent.env",
        {
            "RINGSERVE_MODEL": REPO,
            "RINGSERVE_HOSTS": json.dumps(hosts),
            "RINGSERVE_PARALLEL": parallel,
        },
    )


def memory(free: int) -> HostMemory:
    return HostMemory(
        free=free, ranks_here=1, from_budget=False, device_free=free, own_device=False
    )


def test_a_pipeline_host_gets_the_files_of_its_ranks_layers_and_tensor_hosts_get_all() -> None:
    settings = two_hosts()
    placements = rank_placements(settings, 0)  # type: ignore[arg-type]
    sizes = ModelSizes((MIB, MIB, MIB, MIB), MIB)
    layers = file_layers(FILES[:3], WEIGHT_MAP, 4)
    # Host 0 (rank 0) has three times the memory of host 1: rank 0 runs the last three layers.
    shares = plan_shares(
        settings,  # type: ignore[arg-type]
        placements,
        {0: memory(300 * MIB), 1: memory(100 * MIB)},
        sizes,
        layers,
        tensor_splits=True,
        pipeline_splits=True,
    )
    assert shares.layout == "pipeline" and shares.split == (3, 1)
    assert shares.files[1] == {"model-1.safetensors", "model-3.safetensors"}
    assert shares.files[0] == set(FILES[:3])

    tensor = plan_shares(
        two_hosts("auto"),  # type: ignore[arg-type]
        placements,
        {0: memory(100 * MIB), 1: memory(100 * MIB)},
        sizes,
        layers,
        tensor_splits=True,
        pipeline_splits=True,
    )
    assert tensor.layout == "tensor" and tensor.split == ()
    assert tensor.files[0] == tensor.files[1] == set(FILES[:3])


def held(source: Source, commit: str | None, reached_hub: bool = False) -> Prepared:
    return Prepared(
        host="h", path="/c", source=source, commit=commit, weight_bytes=1, reached_hub=reached_hub
    )


def test_the_origin_is_this_host_or_the_first_that_holds_the_revision_else_a_download() -> None:
    order = ["a", "b", "c"]
    other = "d" * 40
    holds_b = {"a": held("copy", None), "b": held("cache", COMMIT), "c": held("cache", COMMIT)}
    origin = choose_origin(REPO, holds_b, order, "a")
    assert origin is not None and (origin.host, origin.download) == ("b", False)
    # This host reached the hub and lacks weights: another host's copy of that commit serves.
    online = {**holds_b, "a": held("hub", COMMIT, reached_hub=True)}
    origin = choose_origin(REPO, online, order, "a")
    assert origin is not None and origin.host == "b"
    # A host holding an older commit is no origin: this host downloads the hub's.
    stale = {**online, "b": held("cache", other), "c": held("copy", None)}
    origin = choose_origin(REPO, stale, order, "a")
    assert origin is not None and (origin.host, origin.download, origin.commit) == (
        "a",
        True,
        COMMIT,
    )
    nobody = {"a": held("copy", None), "b": held("copy", None)}
    assert choose_origin(REPO, nobody, ["a", "b"], "a") is None
    with pytest.raises(ModelUnavailableError, match="different revisions"):
        choose_origin(
            REPO, {"a": held("cache", COMMIT), "b": held("cache", other)}, ["a", "b"], "a"
        )


def test_a_host_needs_what_it_does_not_hold_checked_in_this_commit() -> None:
    manifest = {
        "config.json": CachedFile(size=10, etag="a" * 40),
        "model-1.safetensors": CachedFile(size=20, etag="b" * 64),
        "model-2.safetensors": CachedFile(size=30, etag="c" * 64),
    }
    wanted = wanted_files(manifest, frozenset({"model-2.safetensors"}))
    assert set(wanted) == {"config.json", "model-2.safetensors"}
    holding = Holding(repo_dir="/r", commit=COMMIT, files=dict(manifest), checked=("config.json",))
    host = held("copy", COMMIT).model_copy(update={"holding": holding})
    assert set(still_needed(wanted, host, COMMIT)) == {"model-2.safetensors"}
    assert still_needed(wanted, host, COMMIT, checked=False) == {}
    assert set(still_needed(wanted, host, "d" * 40)) == set(wanted)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty hub cache of this process, and its own record of checked blobs."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(store, "RECORD", tmp_path / "record.json")
    yield tmp_path / "hub"


def origin_dir(tmp_path: Path, files: dict[str, bytes]) -> tuple[Endpoint, dict[str, CachedFile]]:
    source = tmp_path / "origin"
    source.mkdir()
    manifest = {}
    for name, data in files.items():
        (source / name).write_bytes(data)
        manifest[name] = CachedFile(size=len(data), etag=hub_etag(name, data))
    return Endpoint("origin", LocalFiles(), str(tmp_path / "unused"), str(source)), manifest


FILES_DATA = {
    "config.json": b'{"model_type": "qwen3"}',
    "model-1.safetensors": bytes(range(256)) * 4096,
}


def test_copied_files_are_checked_put_in_place_and_found_by_huggingface_hub(
    cache: Path, tmp_path: Path
) -> None:
    origin, manifest = origin_dir(tmp_path, FILES_DATA)
    target = Endpoint("b", LocalFiles(), str(store.repo_dir(REPO)))

    def settle(wanted: Mapping[str, CachedFile]) -> store.Settled:
        return store.settle(REPO, COMMIT, "main", wanted)

    moved: list[int] = []
    received = receive(origin, target, manifest, settle, moved.append, lambda n: None, REPO)
    assert (received.files, received.bytes, received.resumed) == (2, sum(moved), 0)
    assert sum(moved) == sum(len(d) for d in FILES_DATA.values())
    found = Path(snapshot_download(REPO, local_files_only=True))
    assert found.name == COMMIT
    assert (found / "model-1.safetensors").read_bytes() == FILES_DATA["model-1.safetensors"]
    assert store.holding(REPO, found).checked == tuple(sorted(FILES_DATA))
    # A second time: nothing moves.
    again = receive(origin, target, manifest, settle, moved.append, lambda n: None, REPO)
    assert (again.files, again.bytes) == (0, 0)


def test_a_changed_file_is_checked_again_found_broken_and_copied_again(
    cache: Path, tmp_path: Path
) -> None:
    origin, manifest = origin_dir(tmp_path, FILES_DATA)
    target = Endpoint("b", LocalFiles(), str(store.repo_dir(REPO)))

    def settle(wanted: Mapping[str, CachedFile]) -> store.Settled:
        return store.settle(REPO, COMMIT, "main", wanted)

    receive(origin, target, manifest, settle, lambda n: None, lambda n: None, REPO)
    blob = store.blob_path(store.repo_dir(REPO), manifest["model-1.safetensors"].etag or "")
    with blob.open("r+b") as handle:  # same size, other bytes
        handle.seek(1000)
        handle.write(b"\xff" * 8)
    snapshot = store.repo_dir(REPO) / "snapshots" / COMMIT
    assert "model-1.safetensors" not in store.holding(REPO, snapshot).checked
    received = receive(origin, target, manifest, settle, lambda n: None, lambda n: None, REPO)
    assert received.broken == ("model-1.safetensors",) and received.files == 1
    assert blob.read_bytes() == FILES_DATA["model-1.safetensors"]


def test_a_partial_copy_resumes_where_it_stopped(cache: Path, tmp_path: Path) -> None:
    origin, manifest = origin_dir(tmp_path, FILES_DATA)
    weights = manifest["model-1.safetensors"]
    partial = store.partial_path(store.repo_dir(REPO), weights.etag or "")
    partial.parent.mkdir(parents=True)
    half = weights.size // 2
    partial.write_bytes(FILES_DATA["model-1.safetensors"][:half])
    target = Endpoint("b", LocalFiles(), str(store.repo_dir(REPO)))
    moved: list[int] = []
    received = receive(
        origin,
        target,
        {"model-1.safetensors": weights},
        lambda wanted: store.settle(REPO, COMMIT, "main", wanted),
        moved.append,
        lambda n: None,
        REPO,
    )
    assert received.resumed == 1 and received.bytes == sum(moved) == weights.size - half
    assert not partial.exists()
    blob = store.blob_path(store.repo_dir(REPO), weights.etag or "")
    assert blob.read_bytes() == FILES_DATA["model-1.safetensors"]


def test_an_origin_whose_copy_does_not_match_the_hub_is_named(cache: Path, tmp_path: Path) -> None:
    origin, manifest = origin_dir(tmp_path, FILES_DATA)
    (Path(origin.snapshot) / "model-1.safetensors").write_bytes(
        b"\0" * manifest["model-1.safetensors"].size
    )
    target = Endpoint("b", LocalFiles(), str(store.repo_dir(REPO)))
    with pytest.raises(OriginBroken, match="on origin does not match the hub's hash"):
        copy_file(origin, target, "model-1.safetensors", manifest["model-1.safetensors"], 0, print)
