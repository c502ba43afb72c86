"""A hub model on a ring of two hosts (network namespaces with their own sshd, as the multi-host
tests build them, host A launching): what the hub sends, what host B holds, how fast the copy
over the launcher's SSH connection runs, and what a second start moves.

    sudo .venv/bin/python bench/model_copy.py [--size demo] [--shard-mib 16]

The demo model re-saved in files of about `--shard-mib`, served by a hub on A's loopback
address (tests/hub_server.py), split as a pipeline 3:1 (A may hold three times what B may).
B receives its share from A (`fetch: copy`, the default), then, in a second ring with fresh
caches, downloads it from the hub itself (`fetch: hub`). Prints a Markdown table for
bench/RESULTS.md. Starts and stops every ring itself; needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringserve.cluster.model_copy import Endpoint, LocalFiles, RemoteFiles, copy_file
from ringserve.cluster.remote import RemoteHost
from ringserve.config.settings import load_settings
from ringserve.model.demo import ensure_demo_model
from ringserve.model.store import CachedFile
from ringserve.telemetry.memory import human_bytes
from tests.hub_cache import hub_etag, sharded_copy
from tests.hub_server import HubRepo, serving
from tests.netns import NetnsCluster, inside_namespace, running_cluster, unavailable_reason
from tests.ring import launch
from tests.test_e2e_hosts import hosts_env

REPO = "bench-org/demo-shards"
COPIED = re.compile(r"copied (\d+) file\(s\), ([\d.]+ \w+), from .* in ([\d.]+) s")
SPLIT = re.compile(r"a pipeline of ([\d:]+) layers")


def weights_in(hf_home: Path) -> int:
    found = (hf_home / "hub").glob("models--*/snapshots/*/*.safetensors")
    return sum(path.stat().st_size for path in found)


def ring(
    cluster: NetnsCluster, root: Path, models_dir: Path, endpoint: str, fetch: str, weights: int
) -> dict[str, str]:
    env = hosts_env(cluster, root / "run", models_dir, hf_home=str(root / "b-hf"), fetch=fetch)
    hosts = json.loads(env["RINGSERVE_HOSTS"])
    # Budgets a quarter and three quarters of what the ring needs together (with headroom).
    for host, share in zip(hosts, (3, 1), strict=True):
        host["memory_budget"] = weights * share
    env.update(
        RINGSERVE_HOSTS=json.dumps(hosts),
        RINGSERVE_MODEL=REPO,
        RINGSERVE_PARALLEL="pipeline",
        RINGSERVE_START_TIMEOUT="300",
        HF_HOME=str(root / "a-hf"),
        HF_ENDPOINT=endpoint,
    )
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    return env


@dataclass(frozen=True)
class Row:
    fetch: str
    split: str
    hub_sent: int
    weights: int
    b_holds: int
    copy: str
    first_start_s: float
    second_moves: str
    second_start_s: float


def run(
    cluster: NetnsCluster, root: Path, models_dir: Path, repo: HubRepo, endpoint: str, fetch: str
) -> Row:
    weights = sum(len(data) for name, data in repo.files.items() if name.endswith(".safetensors"))
    env = ring(cluster, root, models_dir, endpoint, fetch, weights)
    before = sum(repo.sent.values())
    started = time.monotonic()
    first = launch(env, "start").stderr
    first_s = time.monotonic() - started
    sent = sum(repo.sent.values()) - before
    launch(env, "stop")
    started = time.monotonic()
    second = launch(env, "start").stderr
    second_s = time.monotonic() - started
    launch(env, "stop")
    copied = COPIED.search(" ".join(first.split()))
    moved = "copied" in second or "downloaded" in second
    split = SPLIT.search(first)
    return Row(
        fetch=fetch,
        split=split[1] if split else "?",
        hub_sent=sent,
        weights=weights,
        b_holds=weights_in(root / "b-hf"),
        copy=f"{copied[2]} in {copied[3]} s" if copied else "-",
        first_start_s=first_s,
        second_moves="something" if moved else "nothing",
        second_start_s=second_s,
    )


def sftp_rate(cluster: NetnsCluster, root: Path, models_dir: Path, model: Path) -> float:
    """Bytes a second `copy_file` moves from A's disk to B's over one SFTP channel, hashing
    what it sends as a first copy does (the copy alone: no check on B's side)."""
    env = hosts_env(cluster, root / "raw" / "run", models_dir)
    settings = load_settings(root / "absent.env", env)
    files = {
        path.name: CachedFile(size=path.stat().st_size, etag=hub_etag(path.name, path.read_bytes()))
        for path in sorted(model.glob("*.safetensors"))
    }
    origin = Endpoint("a", LocalFiles(), "", str(model))
    with RemoteHost.open(settings.hosts[1], settings) as b:
        sftp = b.session.sftp()
        target = Endpoint("b", RemoteFiles(sftp), str(root / "raw" / "b-repo"))
        started = time.monotonic()
        for name, cached in files.items():
            copy_file(origin, target, name, cached, 0, lambda n: None)
        seconds = time.monotonic() - started
        sftp.close()
    return sum(c.size for c in files.values()) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="demo", choices=["tiny-deep", "demo"])
    parser.add_argument("--shard-mib", type=int, default=16)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        sys.exit(f"cannot build the test hosts: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models_dir = root / "models"
        model = sharded_copy(
            ensure_demo_model(models_dir, args.size), root / "shards", args.shard_mib << 20
        )
        repo = HubRepo.from_dir(REPO, model)
        rows = []
        with running_cluster(root / "netns") as cluster, inside_namespace(cluster.a.namespace):
            with serving(repo, host=cluster.a.address) as endpoint:
                for fetch in ("copy", "hub"):
                    rows.append(run(cluster, root / fetch, models_dir, repo, endpoint, fetch))
            rate = sftp_rate(cluster, root, models_dir, model)
    files = len([n for n in repo.files if n.endswith(".safetensors")])
    print(f"{args.size} model, {files} weight files of about {args.shard_mib} MiB, 2 hosts\n")
    print(f"SFTP alone, A to B, every weight file once: {rate / 1e6:.1f} MB/s\n")
    print(
        "| B's fetch | split (rank 0 on A first) | hub sent | model's weights | B holds | "
        "copy A→B | first start | second start |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row.fetch} | {row.split} | {human_bytes(row.hub_sent)} "
            f"| {human_bytes(row.weights)} | {human_bytes(row.b_holds)} | {row.copy} "
            f"| {row.first_start_s:.1f} s "
            f"| {row.second_moves} moved, {row.second_start_s:.1f} s |"
        )


if __name__ == "__main__":
    main()
