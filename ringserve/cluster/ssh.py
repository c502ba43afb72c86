"""One SSH connection to a configured host, with every failure turned into one clear line."""

from __future__ import annotations

import getpass
import logging
import shlex
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko

from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import RemoteHostError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    rc: int
    out: str
    err: str


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise _UnknownHostKey(hostname)


def known_hosts_file(settings: Settings) -> Path:
    return settings.ssh_known_hosts or Path.home() / ".ssh" / "known_hosts"


def host_label(host: HostSpec) -> str:
    """How a host is named in messages: user@host:port as configured."""
    user = f"{host.user}@" if host.user else ""
    port = f":{host.port}" if host.port != 22 else ""
    return f"{user}{host.host}{port}"


class SshSession:
    """A connected host; use as a context manager so the connection is always closed."""

    def __init__(self, host: HostSpec, client: paramiko.SSHClient) -> None:
        self.host = host
        self._client = client

    @property
    def label(self) -> str:
        return host_label(self.host)

    def __enter__(self) -> SshSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def sftp(self) -> paramiko.SFTPClient:
        try:
            return self._client.open_sftp()
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteHostError(
                f"{self.label}: SFTP is not available ({exc}); enable the sftp subsystem in its "
                "sshd_config"
            ) from None

    def run(
        self,
        argv: Sequence[str],
        timeout: float | None = 60.0,
        stdin: bytes | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> CommandResult:
        """Run argv on the host (each word quoted) and wait for it to finish; `on_line` sees
        each line of its output as it comes."""
        command = shlex.join(argv)
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise RemoteHostError(f"{self.label}: the SSH connection was closed; try again")
        try:
            channel = transport.open_session(timeout=timeout)
            with channel:
                channel.settimeout(timeout)
                channel.exec_command(command)
                if stdin is not None:
                    channel.sendall(stdin)
                channel.shutdown_write()
                err_chunks: list[bytes] = []
                err_reader = threading.Thread(
                    target=_drain, args=(channel.recv_stderr, err_chunks), daemon=True
                )
                err_reader.start()
                out_chunks: list[bytes] = []
                _drain(channel.recv, out_chunks, on_line)
                err_reader.join(timeout)
                rc = channel.recv_exit_status()
        except TimeoutError:
            raise RemoteHostError(
                f"{self.label}: `{_short(command)}` did not finish within {timeout:g} s"
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteHostError(
                f"{self.label}: running `{_short(command)}` failed: {exc}"
            ) from None
        out = b"".join(out_chunks).decode(errors="replace")
        err = b"".join(err_chunks).decode(errors="replace")
        log.debug("%s: %s -> rc %d", self.label, _short(command), rc)
        return CommandResult(rc, out, err)


def _drain(
    read: Callable[[int], bytes],
    chunks: list[bytes],
    on_line: Callable[[str], None] | None = None,
) -> None:
    pending = b""
    while data := read(65536):
        chunks.append(data)
        if on_line is not None:
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                on_line(line.decode(errors="replace"))
    if on_line is not None and pending:
        on_line(pending.decode(errors="replace"))


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def connect(host: HostSpec, settings: Settings) -> SshSession:
    """Open an authenticated, host-key-verified connection or raise one RemoteHostError."""
    label = host_label(host)
    client = paramiko.SSHClient()
    known_hosts = known_hosts_file(settings)
    try:
        if settings.ssh_trust_new_hosts and not known_hosts.exists():
            known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            known_hosts.touch(mode=0o600)
        if known_hosts.exists():
            client.load_host_keys(str(known_hosts))
        if settings.ssh_trust_new_hosts:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(_RejectUnknown())
        key_file = str(Path(host.key_file).expanduser()) if host.key_file else None
        timeout = settings.ssh_connect_timeout
        client.connect(
            host.host,
            port=host.port,
            username=host.user or getpass.getuser(),
            key_filename=key_file,
            look_for_keys=key_file is None,
            allow_agent=key_file is None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except BaseException as exc:
        client.close()
        if isinstance(exc, Exception):
            raise RemoteHostError(_explain(exc, host, label, known_hosts)) from None
        raise
    log.debug("%s: connected", label)
    return SshSession(host, client)


def _explain(exc: Exception, host: HostSpec, label: str, known_hosts: Path) -> str:
    where = "RINGSERVE_HOSTS"
    if isinstance(exc, _UnknownHostKey):
        keyscan = f"ssh-keyscan{' -p ' + str(host.port) if host.port != 22 else ''} {host.host}"
        return (
            f"{label}: host key unknown (not in {known_hosts}); set "
            f"RINGSERVE_SSH_TRUST_NEW_HOSTS=true or add it with `{keyscan} >> {known_hosts}`"
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        name = host.host if host.port == 22 else f"[{host.host}]:{host.port}"
        return (
            f"{label}: host key does not match the one in {known_hosts} (possible impersonation); "
            f"if the host was reinstalled, remove the old key with "
            f"`ssh-keygen -f {known_hosts} -R {shlex.quote(name)}`"
        )
    if isinstance(exc, paramiko.AuthenticationException):
        key = f"key {host.key_file}" if host.key_file else "the default keys and agent"
        return (
            f"{label}: authentication failed with {key}; set the host's key_file in {where} "
            "or add the public key to ~/.ssh/authorized_keys on that host"
        )
    if isinstance(exc, (FileNotFoundError, PermissionError)) and host.key_file:
        return f"{label}: cannot read key_file {host.key_file} ({exc.strerror}); fix it in {where}"
    if isinstance(exc, socket.gaierror):
        return f"{label}: cannot resolve {host.host!r}; fix the address in {where}"
    if isinstance(exc, TimeoutError):
        return (
            f"{label}: unreachable (no answer within the timeout); check the address in {where}, "
            "the network and that sshd runs there"
        )
    if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError, ConnectionError, OSError)):
        reason = getattr(exc, "strerror", None) or str(exc)
        return (
            f"{label}: unreachable ({reason}); check the address and port in {where} "
            "and that sshd runs there"
        )
    if isinstance(exc, paramiko.SSHException):
        return f"{label}: SSH failed ({exc}); check that the address in {where} is an SSH server"
    return f"{label}: SSH connection failed ({type(exc).__name__}: {exc})"
