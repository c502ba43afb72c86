"""A hub model reaches every host once: host A holds it in its Hugging Face cache, host B
(HF_HUB_OFFLINE, an empty cache) receives over the launcher's SSH connection only the files
its pipeline rank's layers need, checked against the hub's hashes there.

The 8-layer tiny model re-saved in eight safetensors files of about 1 MiB; A may hold three
times what B may, so rank 1 on B runs layer 0 alone and needs three files: the embedding's, the
one where layer 0 ends and layer 1 begins, and the head's. One story on one pair of hosts:

1. a first start over a slow link loses B's connection mid-file: it fails naming B;
2. a file that copy had finished is then damaged on B; the next start resumes the cut file,
   finds the damaged one, copies it again, and the ring serves;
3. a start after that copies nothing, and the ring answers as a one-rank ring does.

And the other way round, without ranks: B holds the model, A does not, A receives its share.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants
from rich.console import Console

from ringserve.cluster.model_prep import prepare_model
from ringserve.cluster.remote import RemoteHost
from ringserve.config.settings import load_settings
from ringserve.errors import ModelUnavailableError
from ringserve.model import store
from ringserve.model.demo import ensure_demo_model
from tests.hub_cache import cache_repo, hub_etag, sharded_copy
from tests.netns import NetnsCluster, inside_namespace
from tests.ring import (
    PROJECT_DIR,
    Ring,
    no_eos,
    rings_together,
    running_ring,
    started_ring,
    stop_and_check,
)
from tests.test_e2e_hosts import hosts_env, ringserve_processes

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
REPO = "test-org/tiny-deep-shards"
BUDGETS = [12_000_000, 4_000_000]  # A (rank 0) may hold three times what B may
B_FILES = {f"model-0000{n}-of-00008.safetensors" for n in (1, 2, 8)}
PROMPTS = ["The ring of machines", "def add(a, b):"]


@pytest.fixture(scope="module")
def sharded(models_dir: Path) -> Path:
    return sharded_copy(ensure_demo_model(models_dir, "tiny-deep"), models_dir / "shards", 1 << 20)


def copy_env(
    cluster: NetnsCluster, root: Path, models_dir: Path, budgets: list[int]
) -> dict[str, str]:
    """A ring of A (cache root/a-hf) and B (cache root/b-hf), offline, split as a pipeline."""
    env = hosts_env(cluster, root / "run", models_dir, hf_home=str(root / "b-hf"))
    hosts = json.loads(env["RINGSERVE_HOSTS"])
    for host, budget in zip(hosts, budgets, strict=True):
        host["memory_budget"] = budget
    env.update(
        RINGSERVE_HOSTS=json.dumps(hosts),
        RINGSERVE_MODEL=REPO,
        RINGSERVE_PARALLEL="pipeline",
        HF_HOME=str(root / "a-hf"),
        HF_HUB_OFFLINE="1",
    )
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT"):
        env.pop(name, None)
    return env


def repo_in(hf_home: Path) -> Path:
    return hf_home / "hub" / ("models--" + REPO.replace("/", "--"))


def snapshot_weights(hf_home: Path) -> dict[str, bytes]:
    snapshots = list((repo_in(hf_home) / "snapshots").glob("*"))
    assert len(snapshots) == 1, snapshots
    return {p.name: p.read_bytes() for p in snapshots[0].glob("*.safetensors")}


@contextlib.contextmanager
def slow_link(cluster: NetnsCluster) -> Iterator[None]:
    """A's side of the link sends 4 Mbit/s: a copy of a megabyte takes two seconds."""
    device = ["dev", cluster.veth[0]]
    tc = ["ip", "netns", "exec", cluster.a.namespace, "tc", "qdisc"]
    subprocess.run([*tc, "add", *device, "root", "tbf", "rate", "4mbit", "burst", "16kb",
                    "latency", "400ms"], check=True, capture_output=True)  # fmt: skip
    try:
        yield
    finally:
        subprocess.run([*tc, "del", *device, "root"], capture_output=True)


def cut_b_connections(cluster: NetnsCluster) -> None:
    """End every SSH session B's sshd serves (its children), as a dropped link would."""
    assert cluster.b.sshd is not None
    listed = subprocess.run(
        ["ip", "netns", "pids", cluster.b.namespace], capture_output=True, text=True, check=True
    )
    for pid in map(int, listed.stdout.split()):
        with contextlib.suppress(OSError):
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == cluster.b.sshd.pid:
                os.kill(pid, signal.SIGKILL)


def start_cut_mid_file(env: dict[str, str], cluster: NetnsCluster, partial: Path, size: int) -> str:
    """`start`, with B's connection cut once `partial` holds part of its `size` bytes."""
    launcher = subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "launch.py"), "start"],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    try:
        while not (partial.is_file() and 200_000 <= partial.stat().st_size <= size - 200_000):
            assert launcher.poll() is None, launcher.communicate()[1]
            assert time.monotonic() < deadline, "the copy never reached the file"
            time.sleep(0.02)
        cut_b_connections(cluster)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == ModelUnavailableError.exit_code, stderr
    return stderr


@dataclass
class Story:
    cluster: NetnsCluster
    root: Path
    model: Path
    a_weights: dict[str, bytes]
    cut: str = ""  # what the interrupted start printed
    resumed: str = ""  # the start after it
    again: str = ""  # the start after that
    partial_size: int = 0
    cut_started: bool = False  # whether the cut start left a run behind
    ring: Ring | None = None
    reference: Ring | None = None


@pytest.fixture(scope="module")
def story(
    netns_cluster: NetnsCluster,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    sharded: Path,
) -> Iterator[Story]:
    cluster = netns_cluster
    root = tmp_path_factory.mktemp("model-copy")
    with inside_namespace(cluster.a.namespace):
        cache_repo(sharded, root / "a-hf" / "hub", REPO)
        env = copy_env(cluster, root, models_dir, BUDGETS)
        told = Story(cluster, root, sharded, snapshot_weights(root / "a-hf"))
        settings = load_settings(PROJECT_DIR / "absent.env", env)
        with RemoteHost.open(settings.hosts[1], settings) as b:  # pushed before the link slows
            b.push(PROJECT_DIR, show_progress=False)
        second = (sharded / "model-00002-of-00008.safetensors").read_bytes()
        partial = (
            repo_in(root / "b-hf") / "blobs" / (hub_etag("x.safetensors", second) + ".incomplete")
        )
        try:
            with slow_link(cluster):
                told.cut = start_cut_mid_file(env, cluster, partial, len(second))
            told.partial_size = partial.stat().st_size
            told.cut_started = (root / "run" / "state.json").exists()
            first = (sharded / "model-00001-of-00008.safetensors").read_bytes()
            blob = repo_in(root / "b-hf") / "blobs" / hub_etag("x.safetensors", first)
            with blob.open("r+b") as handle:  # the finished copy is damaged, its size kept
                handle.seek(len(first) // 2)
                handle.write(b"\x00" * 64)
            with started_ring(env, root / "run") as ring:
                told.resumed = ring.start_log
            one = running_ring(root / "one", models_dir, ranks=1, model=str(sharded))
            with rings_together(one, started_ring(env, root / "run")) as (reference, ring):
                told.again, told.ring, told.reference = ring.start_log, ring, reference
                yield told
        finally:
            stop_and_check(Ring(env=env, run_dir=root / "run"))
            assert not ringserve_processes(cluster, root / "run")


def flat(text: str) -> str:
    return " ".join(text.split())


def test_a_copy_cut_mid_file_names_the_host_in_one_line_and_nothing_starts(story: Story) -> None:
    b = f"root@{story.cluster.b.address}"
    lines = [line for line in story.cut.splitlines() if line.startswith("ringserve:")]
    assert len(lines) == 1, story.cut
    assert f"model {REPO} on {b}: copying model-00002-of-00008.safetensors from" in lines[0]
    assert "failed (the connection was lost); start again to resume it" in lines[0]
    assert 200_000 <= story.partial_size < len(story.a_weights["model-00002-of-00008.safetensors"])
    assert not story.cut_started


def test_the_next_start_resumes_the_cut_file_and_copies_a_damaged_one_again(story: Story) -> None:
    b = f"root@{story.cluster.b.address}"
    log = flat(story.resumed)
    assert f"to {b} in" in log and "(1 resumed where an earlier copy stopped)" in log, log
    assert "replaced 1 broken file(s): model-00001-of-00008.safetensors" in log, log
    assert "a pipeline of 7:1 layers" in log
    # B holds its share, byte for byte as A does, and nothing half-copied.
    held = snapshot_weights(story.root / "b-hf")
    assert set(held) == B_FILES
    assert all(held[name] == story.a_weights[name] for name in held)
    assert not list((repo_in(story.root / "b-hf") / "blobs").glob("*.incomplete"))


def test_a_second_start_copies_nothing(story: Story) -> None:
    b = f"root@{story.cluster.b.address}"
    log = flat(story.again)
    assert f"model {REPO}: cached on {b} (its ranks' share: 3 weight file(s)" in log, log
    assert "copied" not in log


def test_b_holds_only_its_share_and_the_ring_answers_as_one_rank(story: Story) -> None:
    assert story.ring is not None and story.reference is not None
    weights = sum(len(data) for data in story.a_weights.values())
    held = sum(len(data) for data in snapshot_weights(story.root / "b-hf").values())
    assert held < weights / 2  # three of eight files: its layer, the embedding and the head
    with story.ring.http() as http:
        info = http.get("/model/info").json()
    assert info["parallel"] == "pipeline"
    assert [s["layers"] for s in info["split"]] == [[1, 8], [0, 1]]
    body = {
        "prompt": PROMPTS,
        "max_tokens": 16,
        "temperature": 0,
        "logit_bias": no_eos(story.model),
    }
    answers = []
    for ring in (story.reference, story.ring):
        with ring.http() as http:
            reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        answers.append(
            [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]
        )
    assert answers[0] == answers[1]


def test_a_host_that_holds_the_model_is_the_origin_when_this_one_does_not(
    netns_on_a: NetnsCluster,
    tmp_path: Path,
    models_dir: Path,
    sharded: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B holds it, A's cache is empty: A receives its share from B (read over SFTP), here in
    the launcher's own process, without starting ranks."""
    cluster = netns_on_a
    cache_repo(sharded, tmp_path / "b-hf" / "hub", REPO)
    env = copy_env(cluster, tmp_path, models_dir, list(reversed(BUDGETS)))
    settings = load_settings(PROJECT_DIR / "absent.env", env)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "a-hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(store, "RECORD", tmp_path / "record.json")
    output = io.StringIO()
    with RemoteHost.open(settings.hosts[1], settings) as b:
        b.push(PROJECT_DIR, show_progress=False)
        ready = prepare_model(settings, {settings.hosts[1]: b}, Console(file=output, width=300))
    # Rank 0 on A runs the last layer: the embedding's file, the last layers' and the head's.
    assert ready.split == (1, 7)
    held = snapshot_weights(tmp_path / "a-hf")
    assert set(held) == {f"model-0000{n}-of-00008.safetensors" for n in (1, 7, 8)}
    assert all(held[name] == (sharded / name).read_bytes() for name in held)
    log = flat(output.getvalue())
    assert f"from root@{cluster.b.address} to" in log, log
