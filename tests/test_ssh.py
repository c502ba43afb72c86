"""Connecting from host A to host B over a real sshd: success and each way it can fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringserve.cluster.ssh import connect
from ringserve.config.settings import HostSpec
from ringserve.errors import RemoteHostError
from ringserve.platform.addresses import detect_local_host, local_addresses
from tests.netns import NetnsCluster, host_b, ssh_settings

pytestmark = pytest.mark.netns


def test_a_command_runs_on_the_host_with_its_words_quoted(netns_on_a: NetnsCluster) -> None:
    with connect(host_b(netns_on_a), ssh_settings(netns_on_a)) as session:
        result = session.run(["printf", "%s|", "two words", "$HOME", "; rm -rf /"])
        address = session.run(["ip", "-brief", "addr"]).out
    assert result.rc == 0
    assert result.out == "two words|$HOME|; rm -rf /|"
    assert netns_on_a.b.address in address


def test_exit_status_and_stderr_come_back(netns_on_a: NetnsCluster) -> None:
    with connect(host_b(netns_on_a), ssh_settings(netns_on_a)) as session:
        result = session.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert (result.rc, result.out, result.err) == (3, "", "oops\n")


def test_a_host_whose_sshd_is_down_is_unreachable(netns_on_a: NetnsCluster) -> None:
    host = host_b(netns_on_a, host=netns_on_a.silent_address)
    with pytest.raises(RemoteHostError, match=r"10\.213\.7\.3: unreachable .*RINGSERVE_HOSTS"):
        connect(host, ssh_settings(netns_on_a))


def test_an_address_nobody_has_times_out(netns_on_a: NetnsCluster) -> None:
    host = host_b(netns_on_a, host=netns_on_a.absent_address)
    with pytest.raises(RemoteHostError, match=r"10\.213\.7\.9: unreachable"):
        connect(host, ssh_settings(netns_on_a, ssh_connect_timeout=1))


def test_a_wrong_key_is_named_in_the_error(netns_on_a: NetnsCluster) -> None:
    host = host_b(netns_on_a, key_file=str(netns_on_a.wrong_key))
    with pytest.raises(RemoteHostError) as caught:
        connect(host, ssh_settings(netns_on_a))
    message = str(caught.value)
    assert message.startswith("root@10.213.7.2: authentication failed with key ")
    assert "wrong_key" in message and "authorized_keys" in message


def test_an_unknown_host_key_is_refused_unless_trusted(
    netns_on_a: NetnsCluster, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    with pytest.raises(RemoteHostError, match="RINGSERVE_SSH_TRUST_NEW_HOSTS=true or add it with"):
        connect(host_b(netns_on_a), ssh_settings(netns_on_a, ssh_known_hosts=empty))
    assert not empty.exists()

    trusting = ssh_settings(netns_on_a, ssh_known_hosts=empty, ssh_trust_new_hosts=True)
    with connect(host_b(netns_on_a), trusting) as session:
        assert session.run(["true"]).rc == 0
    assert empty.read_text().startswith(f"{netns_on_a.b.address} ssh-ed25519 ")

    with connect(host_b(netns_on_a), ssh_settings(netns_on_a, ssh_known_hosts=empty)) as session:
        assert session.run(["true"]).rc == 0


def test_a_changed_host_key_is_refused(netns_on_a: NetnsCluster, tmp_path: Path) -> None:
    a_key = netns_on_a.a.host_key.with_suffix(".pub").read_text().split()
    impostor = tmp_path / "known_hosts"
    impostor.write_text(f"{netns_on_a.b.address} {a_key[0]} {a_key[1]}\n")
    fix = r"`ssh-keygen -f \S+ -R 10\.213\.7\.2`"
    with pytest.raises(RemoteHostError, match=f"does not match .*{fix}"):
        connect(host_b(netns_on_a), ssh_settings(netns_on_a, ssh_known_hosts=impostor))


def test_inside_host_a_the_configured_host_a_is_this_machine(netns_on_a: NetnsCluster) -> None:
    hosts = [HostSpec(host=netns_on_a.b.address), HostSpec(host=netns_on_a.a.address)]
    addresses = local_addresses()
    assert netns_on_a.b.address not in addresses
    assert detect_local_host(hosts, addresses) == 1
