"""Host detection, rank placement and the per-rank MLX environment, without any network."""

from __future__ import annotations

import json

import pytest

from ringserve.cluster.hosts import (
    hostfile_json,
    rank_env,
    rank_placements,
    validate_hosts,
)
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import ConfigError
from ringserve.platform.addresses import _parse_ip_json, detect_local_host, local_addresses

STUDIO = HostSpec(host="studio.lan", ips=("10.0.0.1",))
MINI = HostSpec(host="10.0.0.2")
LAPTOP = HostSpec(host="laptop.lan", ips=("10.0.0.3",), ranks=2)


def settings(*hosts: HostSpec, backend: str = "ring") -> Settings:
    return Settings(hosts=hosts, backend=backend)  # type: ignore[arg-type]


def test_the_host_with_a_local_address_is_this_machine() -> None:
    assert detect_local_host([STUDIO, MINI], {"127.0.0.1", "10.0.0.2"}) == 1
    assert detect_local_host([STUDIO, MINI], {"127.0.0.1", "10.0.0.1"}) == 0


def test_a_name_matches_once_resolved() -> None:
    named = HostSpec(host="mini.lan")
    resolve = {"mini.lan": ["10.0.0.9"]}.get
    assert detect_local_host([STUDIO, named], {"10.0.0.9"}, lambda n: resolve(n) or []) == 1


def test_no_local_host_names_the_hosts_and_the_addresses() -> None:
    with pytest.raises(ConfigError) as caught:
        detect_local_host([STUDIO, MINI], {"127.0.0.1", "192.168.1.7"})
    message = str(caught.value)
    assert "RINGSERVE_HOSTS" in message
    assert "studio.lan (ips 10.0.0.1)" in message and "10.0.0.2" in message
    assert "192.168.1.7" in message


def test_two_local_hosts_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"several configured hosts .*studio\.lan.*10\.0\.0\.2"):
        detect_local_host([STUDIO, MINI], {"10.0.0.1", "10.0.0.2"})


def test_ip_json_parsing_keeps_every_address() -> None:
    listing = json.dumps(
        [
            {"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}, {"local": "::1"}]},
            {"ifname": "en0", "addr_info": [{"local": "10.0.0.1"}, {"local": "fe80::1%en0"}]},
            {"ifname": "down", "addr_info": []},
        ]
    )
    assert _parse_ip_json(listing) == {"127.0.0.1", "::1", "10.0.0.1", "fe80::1"}


def test_local_addresses_include_loopback() -> None:
    assert "127.0.0.1" in local_addresses()


def test_the_local_host_serves_rank_zero_and_the_others_follow_in_order() -> None:
    placements = rank_placements(settings(STUDIO, MINI, LAPTOP), local_index=1)
    assert [(p.rank, p.host.host, p.local_rank, p.is_local) for p in placements] == [
        (0, "10.0.0.2", 0, True),
        (1, "studio.lan", 0, False),
        (2, "laptop.lan", 0, False),
        (3, "laptop.lan", 1, False),
    ]


def test_ring_hostfile_gives_each_rank_its_own_port() -> None:
    placements = rank_placements(settings(STUDIO, LAPTOP), local_index=0)
    envs = rank_env(placements, "ring", base_port=32323)
    assert [e.env for e in envs] == [{"MLX_RANK": str(r)} for r in range(3)]
    ring = json.loads(envs[0].files["MLX_HOSTFILE"])
    assert ring == [["10.0.0.1:32323"], ["10.0.0.3:32324"], ["10.0.0.3:32325"]]
    assert all(e.files == envs[0].files for e in envs)
    assert envs[1].with_file_paths({"MLX_HOSTFILE": "/run/ring.json"}) == {
        "MLX_RANK": "1",
        "MLX_HOSTFILE": "/run/ring.json",
    }


def test_one_rank_needs_no_hostfile() -> None:
    envs = rank_env(rank_placements(settings(STUDIO), 0), "ring", base_port=32323)
    assert envs[0].files == {}


def test_hostfile_json_is_what_mlx_launch_reads() -> None:
    user_host = HostSpec(host="10.0.0.2", user="ml")
    placements = rank_placements(settings(STUDIO, user_host), local_index=0)
    assert hostfile_json(placements, "ring", envs=["MLX_METAL_FAST_SYNCH=1"]) == {
        "backend": "ring",
        "envs": ["MLX_METAL_FAST_SYNCH=1"],
        "hosts": [
            {"ssh": "studio.lan", "ips": ["10.0.0.1"], "rdma": []},
            {"ssh": "ml@10.0.0.2", "ips": ["10.0.0.2"], "rdma": []},
        ],
    }


JACCL = [
    HostSpec(host="10.0.0.1", rdma=(None, "rdma_en2", "rdma_en3")),
    HostSpec(host="10.0.0.2", rdma=("rdma_en2", None, "rdma_en4")),
    HostSpec(host="10.0.0.3", rdma=("rdma_en3", "rdma_en4", None)),
]


def test_jaccl_matrix_follows_the_rank_order() -> None:
    placements = rank_placements(settings(*JACCL, backend="jaccl"), local_index=2)
    # Ranks: host 2, host 0, host 1; the columns follow the same order.
    expected = [[None, "rdma_en3", "rdma_en4"], ["rdma_en3", None, "rdma_en2"]]
    expected.append(["rdma_en4", "rdma_en2", None])
    envs = rank_env(placements, "jaccl", base_port=40000)
    assert json.loads(envs[1].files["MLX_IBV_DEVICES"]) == expected
    assert envs[1].env == {"MLX_RANK": "1", "MLX_JACCL_COORDINATOR": "10.0.0.3:40000"}
    assert [h["rdma"] for h in hostfile_json(placements, "jaccl")["hosts"]] == expected


def test_nccl_env_points_every_rank_at_rank_zero() -> None:
    two_gpus = HostSpec(host="10.0.0.2", ranks=2)
    placements = rank_placements(settings(STUDIO, two_gpus, backend="nccl"), local_index=0)
    envs = rank_env(placements, "nccl", base_port=12345)
    assert [e.env for e in envs][2] == {
        "MLX_RANK": "2",
        "MLX_WORLD_SIZE": "3",
        "NCCL_HOST_IP": "10.0.0.1",
        "NCCL_PORT": "12345",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert all(e.files == {} for e in envs)


@pytest.mark.parametrize(
    ("hosts", "backend", "complaint"),
    [
        (
            [STUDIO, HostSpec(host="other", ips=("10.0.0.1",))],
            "ring",
            "10.0.0.1 is listed for both",
        ),
        ([STUDIO, HostSpec(host="mini.lan")], "ring", "host mini.lan needs IP addresses"),
        ([*JACCL[:2], HostSpec(host="10.0.0.3", rdma=("a", "b"))], "jaccl", "one entry per host"),
        ([*JACCL[:2], HostSpec(host="10.0.0.3", rdma=("a", "b", "c"))], "jaccl", "must be null"),
        ([*JACCL[:2], HostSpec(host="10.0.0.3")], "jaccl", "got none"),
    ],
)
def test_bad_host_lists_are_refused_with_the_variable_and_host(
    hosts: list[HostSpec], backend: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match="RINGSERVE_HOSTS") as caught:
        validate_hosts(hosts, backend)  # type: ignore[arg-type]
    assert complaint in str(caught.value)


def test_jaccl_and_nccl_need_an_ip_for_rank_zero() -> None:
    placements = rank_placements(settings(HostSpec(host="mini.lan"), backend="nccl"), 0)
    with pytest.raises(ConfigError, match=r"mini\.lan serves rank 0"):
        rank_env(placements, "nccl", base_port=12345)
