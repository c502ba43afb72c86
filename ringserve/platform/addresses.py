"""Which configured host this machine is: its addresses, and the one configured host that has
one of them (a fact of the platform every layer may ask, the launcher and the ranks alike)."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence

from ringserve.config.settings import HostSpec
from ringserve.errors import ConfigError

log = logging.getLogger(__name__)

HOSTS_VAR = "RINGSERVE_HOSTS"
Resolver = Callable[[str], Iterable[str]]


def local_addresses() -> set[str]:
    """Every address of this machine's interfaces, loopback included."""
    addresses = {"127.0.0.1", "::1"}
    try:
        listing = subprocess.run(
            ["ip", "-j", "addr"], capture_output=True, text=True, timeout=5, check=True
        )
        addresses |= _parse_ip_json(listing.stdout)
        return addresses
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("`ip -j addr` unavailable (%s); asking the resolver instead", exc)
    hostname = socket.gethostname()
    for name in (hostname, socket.getfqdn(), "localhost"):
        try:
            addresses |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except OSError:
            continue
    return addresses


def _parse_ip_json(text: str) -> set[str]:
    interfaces = json.loads(text)
    return {
        str(info["local"]).split("%")[0]
        for interface in interfaces
        for info in interface.get("addr_info", ())
        if "local" in info
    }


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _describe(host: HostSpec) -> str:
    return f"{host.host} (ips {', '.join(host.ips)})" if host.ips else host.host


def detect_local_host(
    hosts: Sequence[HostSpec], addresses: set[str], resolve: Resolver | None = None
) -> int:
    """The index of the one configured host that has an address of this machine.

    Names are compared as given unless `resolve` turns them into addresses.
    """
    matches = []
    for index, host in enumerate(hosts):
        candidates = {host.host, *host.ips}
        if resolve is not None:
            for name in [c for c in candidates if not is_ip(c)]:
                candidates |= set(resolve(name))
        if candidates & addresses:
            matches.append(index)
    if len(matches) == 1:
        return matches[0]
    configured = "; ".join(_describe(h) for h in hosts) or "none"
    local = ", ".join(sorted(addresses)) or "none"
    if not matches:
        raise ConfigError(
            f"{HOSTS_VAR}: none of the configured hosts ({configured}) is this machine; "
            f"its addresses are {local}. List this machine's address in `host` or `ips`."
        )
    found = "; ".join(_describe(hosts[i]) for i in matches)
    raise ConfigError(
        f"{HOSTS_VAR}: several configured hosts ({found}) have an address of this machine "
        f"({local}); each host must be listed once with its own addresses."
    )
