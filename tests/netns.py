"""Two test hosts on one machine: network namespaces joined by a veth pair, each with its sshd.

Host A is 10.213.7.1 and host B 10.213.7.2. B also owns 10.213.7.3, where nothing listens
(a host whose sshd is down); 10.213.7.9 is in the subnet but belongs to no one. The test process
plays host A by entering A's namespace (`inside_namespace`); processes it starts follow it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ringserve.config.settings import HostSpec, Settings

SSHD = Path("/usr/sbin/sshd")
SUBNET = "10.213.7"
CLONE_NEWNET = 0x40000000


@dataclass
class NetnsHost:
    namespace: str
    address: str
    directory: Path
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def host_key(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    @property
    def workdir(self) -> Path:
        return self.directory / "home" / "ringserve"


@dataclass
class NetnsCluster:
    a: NetnsHost
    b: NetnsHost
    root: Path
    client_key: Path
    wrong_key: Path
    known_hosts: Path
    silent_address: str = f"{SUBNET}.3"
    absent_address: str = f"{SUBNET}.9"
    veth: tuple[str, str] = ("", "")
    hosts: list[NetnsHost] = field(default_factory=list)


def host_b(cluster: NetnsCluster, **changes: object) -> HostSpec:
    """Host B as RINGSERVE_HOSTS names it (as root, with the test key, its own workdir)."""
    values: dict[str, object] = {
        "host": cluster.b.address,
        "user": "root",
        "key_file": str(cluster.client_key),
        "workdir": str(cluster.b.workdir),
        "python": sys.executable,
    }
    return HostSpec.model_validate(values | changes)


def ssh_settings(cluster: NetnsCluster, **changes: object) -> Settings:
    """Settings that trust the test hosts' keys and give up on a silent host quickly."""
    values: dict[str, object] = {"ssh_known_hosts": cluster.known_hosts, "ssh_connect_timeout": 2}
    return Settings.model_validate(values | changes)


def unavailable_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed; run scripts/test_prereqs.sh"
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        return "openssh-server is not installed; run scripts/test_prereqs.sh"
    probe = f"rsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    argv = ["ip", "netns", "exec", namespace, "ip", *args] if namespace else ["ip", *args]
    subprocess.run(argv, check=True, capture_output=True)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ringserve-test", "-f", str(path)],
        check=True,
    )


def _sshd_config(host: NetnsHost, authorized_keys: Path) -> Path:
    config = host.directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {host.address}:22",
                f"HostKey {host.host_key}",
                "PidFile none",
                f"AuthorizedKeysFile {authorized_keys}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    return config


def start_sshd(host: NetnsHost, authorized_keys: Path) -> None:
    config = _sshd_config(host, authorized_keys)
    log_path = host.directory / "sshd.log"
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    with log_path.open("wb") as log_file:
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, str(SSHD), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while "Server listening" not in log_path.read_text(errors="replace"):
        if host.sshd.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd in {host.namespace} did not start:\n{log_path.read_text()}")
        time.sleep(0.05)


def stop_sshd(host: NetnsHost) -> None:
    if host.sshd is not None and host.sshd.poll() is None:
        host.sshd.terminate()
        try:
            host.sshd.wait(5)
        except subprocess.TimeoutExpired:
            host.sshd.kill()
            host.sshd.wait()
    host.sshd = None


def _kill_namespace_processes(namespace: str) -> None:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[NetnsCluster]:
    """Build both hosts, start their sshd, and remove every trace afterwards."""
    tag = str(os.getpid())
    a = NetnsHost(f"rs{tag}a", f"{SUBNET}.1", root / "a")
    b = NetnsHost(f"rs{tag}b", f"{SUBNET}.2", root / "b")
    cluster = NetnsCluster(
        a=a,
        b=b,
        root=root,
        client_key=root / "client_key",
        wrong_key=root / "wrong_key",
        known_hosts=root / "known_hosts",
        veth=(f"rsv{tag}a", f"rsv{tag}b"),
        hosts=[a, b],
    )
    created: list[str] = []
    try:
        for host in cluster.hosts:
            host.directory.mkdir(parents=True)
            host.workdir.parent.mkdir(parents=True)
            _ip("netns", "add", host.namespace)
            created.append(host.namespace)
            _ip("link", "set", "lo", "up", namespace=host.namespace)
        _ip("link", "add", cluster.veth[0], "type", "veth", "peer", "name", cluster.veth[1])
        for host, veth in zip(cluster.hosts, cluster.veth, strict=True):
            _ip("link", "set", veth, "netns", host.namespace)
            _ip("addr", "add", f"{host.address}/24", "dev", veth, namespace=host.namespace)
            _ip("link", "set", veth, "up", namespace=host.namespace)
        _ip(
            "addr",
            "add",
            f"{cluster.silent_address}/24",
            "dev",
            cluster.veth[1],
            namespace=b.namespace,
        )

        _keygen(cluster.client_key)
        _keygen(cluster.wrong_key)
        authorized_keys = root / "authorized_keys"
        shutil.copy(cluster.client_key.with_suffix(".pub"), authorized_keys)
        lines = []
        for host in cluster.hosts:
            _keygen(host.host_key)
            key_type, key = host.host_key.with_suffix(".pub").read_text().split()[:2]
            lines.append(f"{host.address} {key_type} {key}\n")
            start_sshd(host, authorized_keys)
        cluster.known_hosts.write_text("".join(lines))
        yield cluster
    finally:
        for host in cluster.hosts:
            stop_sshd(host)
        for namespace in created:
            _kill_namespace_processes(namespace)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def inside_namespace(namespace: str) -> Iterator[None]:
    """Run the calling thread (and the threads and processes it starts) in `namespace`."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)
