"""Pushing the project to host B: everything once, then only what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringserve.cluster.push import MANIFEST, project_files, push_project
from ringserve.cluster.ssh import connect
from ringserve.config.settings import HostSpec, Settings
from tests.netns import NetnsCluster

SOURCES = {
    "ringserve/__init__.py": "",
    "ringserve/cluster/hosts.py": "HOSTS = 1\n",
    "ringserve/cluster/test_hosts.py": "def test(): ...\n",
    "ringserve/cluster/__pycache__/hosts.cpython-311.pyc": "bytecode",
    "server.py": "print('rank')\n",
    "api.py": "print('api')\n",
    "launch.py": "print('launch')\n",
    "pyproject.toml": "[project]\nname = 'ringserve'\n",
    "scripts/setup.sh": "#!/bin/sh\necho setup\n",
    ".env": "RINGSERVE_MODEL=tiny\n",
    "README.md": "not needed on a rank host\n",
    "tests/test_ring.py": "def test(): ...\n",
    ".venv/lib/site.py": "",
    ".ringserve/run/rank0.log": "",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for name, text in SOURCES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "scripts/setup.sh").chmod(0o755)
    return root


def test_only_the_project_sources_are_pushed(project: Path) -> None:
    assert project_files(project) == [
        "api.py",
        "launch.py",
        "pyproject.toml",
        "ringserve/__init__.py",
        "ringserve/cluster/hosts.py",
        "scripts/setup.sh",
        "server.py",
    ]


@pytest.mark.netns
def test_a_second_push_sends_only_the_changed_file(netns_on_a: NetnsCluster, project: Path) -> None:
    cluster = netns_on_a
    host = HostSpec(host=cluster.b.address, user="root", key_file=str(cluster.client_key))
    settings = Settings(ssh_known_hosts=cluster.known_hosts)
    workdir = cluster.b.workdir / "push-test"

    with connect(host, settings) as session:
        first = push_project(session, str(workdir), project)
        assert (first.files_total, first.files_sent) == (7, 7)
        assert (workdir / "server.py").read_text() == "print('rank')\n"
        # The user's alone: the executable bit kept, nothing for group or others.
        assert (workdir / "scripts/setup.sh").stat().st_mode & 0o777 == 0o700
        assert (workdir / "server.py").stat().st_mode & 0o777 == 0o600
        assert (workdir / "ringserve").stat().st_mode & 0o777 == 0o700
        assert (workdir / MANIFEST).stat().st_mode & 0o777 == 0o600
        assert not (workdir / ".env").exists()
        assert (workdir / MANIFEST).is_file()
        assert not (workdir / "tests").exists()

        unchanged = push_project(session, str(workdir), project)
        assert (unchanged.files_sent, unchanged.bytes_sent) == (0, 0)

        (project / "ringserve/cluster/hosts.py").write_text("HOSTS = 2\n")
        edited = push_project(session, str(workdir), project)
        assert (edited.files_sent, edited.bytes_sent) == (1, len("HOSTS = 2\n"))
        assert (workdir / "ringserve/cluster/hosts.py").read_text() == "HOSTS = 2\n"

        (workdir / "api.py").write_text("edited on the host\n")
        repaired = push_project(session, str(workdir), project)
        assert repaired.files_sent == 1
        assert (workdir / "api.py").read_text() == "print('api')\n"

        # A file removed here goes on the host too; a file the host's user added stays.
        (project / "ringserve/cluster/hosts.py").unlink()
        (workdir / "ringserve/cluster/notes.txt").write_text("the host's own\n")
        pruned = push_project(session, str(workdir), project)
        assert (pruned.files_sent, pruned.files_removed, pruned.files_total) == (0, 1, 6)
        assert not (workdir / "ringserve/cluster/hosts.py").exists()
        assert (workdir / "ringserve/cluster/notes.txt").read_text() == "the host's own\n"
    assert not list(workdir.rglob("*.part"))


@pytest.mark.netns
def test_a_dotenv_pushed_by_an_earlier_version_is_removed(
    netns_on_a: NetnsCluster, project: Path
) -> None:
    cluster = netns_on_a
    host = HostSpec(host=cluster.b.address, user="root", key_file=str(cluster.client_key))
    settings = Settings(ssh_known_hosts=cluster.known_hosts)
    workdir = cluster.b.workdir / "push-dotenv"
    with connect(host, settings) as session:
        push_project(session, str(workdir), project)
        # What an earlier push left: .env on the host and in its manifest.
        (workdir / ".env").write_text("RINGSERVE_API_KEY=secret\n")
        manifest = json.loads((workdir / MANIFEST).read_text())
        manifest[".env"] = {"sha256": "0" * 64, "size": 25}
        (workdir / MANIFEST).write_text(json.dumps(manifest))
        again = push_project(session, str(workdir), project)
    assert again.files_removed == 1
    assert not (workdir / ".env").exists()
