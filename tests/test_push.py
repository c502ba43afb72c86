"""Pushing the project to host B: everything once, then only what changed."""

from __future__ import annotations

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
        ".env",
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
        assert (first.files_total, first.files_sent) == (8, 8)
        assert (workdir / "server.py").read_text() == "print('rank')\n"
        assert (workdir / "scripts/setup.sh").stat().st_mode & 0o777 == 0o755
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
        assert (pruned.files_sent, pruned.files_removed, pruned.files_total) == (0, 1, 7)
        assert not (workdir / "ringserve/cluster/hosts.py").exists()
        assert (workdir / "ringserve/cluster/notes.txt").read_text() == "the host's own\n"
    assert not list(workdir.rglob("*.part"))
