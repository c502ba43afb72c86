"""Shared fixtures. The `netns_*` fixtures give two SSH hosts in network namespaces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import NetnsCluster, inside_namespace, running_cluster, unavailable_reason


@pytest.fixture(scope="session")
def netns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    """Hosts A and B, each with its own sshd; built once per session, always torn down."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("netns")) as cluster:
        yield cluster


@pytest.fixture
def netns_on_a(netns_cluster: NetnsCluster) -> Iterator[NetnsCluster]:
    """The test runs as host A: its connections leave from A's namespace."""
    with inside_namespace(netns_cluster.a.namespace):
        yield netns_cluster


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny demo model is built once for the whole session."""
    return tmp_path_factory.mktemp("models")
