"""Copying a hub model's files from the host that holds them to another host's Hugging Face
cache, over the SSH connections `start` already has (SFTP, as the project is pushed), this
machine relaying when neither end is this machine.

A file is written as `blobs/<hash>.incomplete` (huggingface_hub's own partial download) and
renamed when whole; a copy interrupted mid-file resumes from what arrived. The receiving host
then checks each file against the hub's hash itself (`store.settle`, there over SSH); a file
that does not match is copied again, whole, once, hashing what the origin sends: if the
origin's bytes do not match either, its copy is the broken one and is named.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import paramiko

from ringserve.errors import ModelUnavailableError, RemoteHostError
from ringserve.model.store import CachedFile, Settled, blob_path, hash_kind, partial_path

CHUNK = 1 << 20
# Read requests an SFTP read keeps in flight: bounds what a slow receiver leaves buffered.
WINDOW = 32 << 20
ATTEMPTS = 2

OnBytes = Callable[[int], None]
Settle = Callable[[Mapping[str, CachedFile]], Settled]


class Files(Protocol):
    """Where files are read or written: this machine's disk, or a host's over SFTP."""

    def read(self, path: str, offset: int, size: int) -> Iterator[bytes]: ...

    def open_at(self, path: str, offset: int) -> IO[bytes]: ...

    def rename(self, source: str, target: str) -> None: ...

    def makedirs(self, path: str) -> None: ...


class LocalFiles:
    def read(self, path: str, offset: int, size: int) -> Iterator[bytes]:
        with open(path, "rb") as handle:
            handle.seek(offset)
            left = size - offset
            while left > 0:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def open_at(self, path: str, offset: int) -> IO[bytes]:
        handle = open(path, "r+b" if offset else "wb")  # noqa: SIM115 (the caller closes it)
        handle.seek(offset)
        handle.truncate()
        return handle

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)


class RemoteFiles:
    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp

    def read(self, path: str, offset: int, size: int) -> Iterator[bytes]:
        with self.sftp.open(path, "rb") as handle:
            request = handle.MAX_REQUEST_SIZE
            for start in range(offset, size, WINDOW):
                end = min(start + WINDOW, size)
                pieces = [(at, min(request, end - at)) for at in range(start, end, request)]
                yield b"".join(handle.readv(pieces))

    def open_at(self, path: str, offset: int) -> IO[bytes]:
        handle = self.sftp.open(path, "r+b" if offset else "wb")
        handle.seek(offset)
        handle.truncate(offset)
        handle.set_pipelined(True)
        return handle

    def rename(self, source: str, target: str) -> None:
        self.sftp.posix_rename(source, target)

    def makedirs(self, path: str) -> None:
        missing = []
        current = path
        while current not in ("", "/"):
            try:
                self.sftp.stat(current)
                break
            except FileNotFoundError:
                missing.append(current)
                current = posixpath.dirname(current)
        for directory in reversed(missing):
            with contextlib.suppress(OSError):
                self.sftp.mkdir(directory)


@dataclass(frozen=True)
class Endpoint:
    """One end of a copy: how to reach its files and where its cache keeps the model."""

    label: str
    files: Files
    repo_dir: str  # models--org--name in its hub cache
    snapshot: str = ""  # the origin's snapshot directory, where its files are read


@dataclass
class Received:
    """What a host received: files and bytes copied, files resumed, broken files replaced."""

    files: int = 0
    bytes: int = 0
    resumed: int = 0
    broken: tuple[str, ...] = ()
    seconds: float = 0.0


class OriginBroken(ModelUnavailableError):
    pass


def copy_file(
    origin: Endpoint,
    target: Endpoint,
    name: str,
    cached: CachedFile,
    offset: int,
    on_bytes: OnBytes,
) -> None:
    """Send `name` from `offset` on into the target's partial blob, then make it the blob.
    From offset 0 the origin's bytes are hashed as they pass: a mismatch names the origin."""
    assert cached.etag is not None
    partial = str(partial_path(Path(target.repo_dir), cached.etag))
    target.files.makedirs(posixpath.dirname(partial))
    kind = hash_kind(cached.etag) if offset == 0 else None
    digest = None
    if kind == "sha256":
        digest = hashlib.sha256()
    elif kind == "git-blob":
        digest = hashlib.sha1(b"blob %d\0" % cached.size)
    sent = offset
    with target.files.open_at(partial, offset) as out:
        for chunk in origin.files.read(posixpath.join(origin.snapshot, name), offset, cached.size):
            out.write(chunk)
            if digest is not None:
                digest.update(chunk)
            sent += len(chunk)
            on_bytes(len(chunk))
    if sent != cached.size:
        raise OriginBroken(
            f"model file {name} on {origin.label} has {sent} bytes where the hub's has "
            f"{cached.size}; remove it from that host's cache and start again"
        )
    if digest is not None and digest.hexdigest() != cached.etag:
        raise OriginBroken(
            f"model file {name} on {origin.label} does not match the hub's hash; remove it from "
            "that host's cache and start again"
        )
    target.files.rename(partial, str(blob_path(Path(target.repo_dir), cached.etag)))


def receive(
    origin: Endpoint,
    target: Endpoint,
    wanted: Mapping[str, CachedFile],
    settle: Settle,
    on_bytes: OnBytes,
    on_total: Callable[[int], None],
    model: str,
) -> Received:
    """Bring the target's copy of `wanted` up to date: settle what it has, copy the rest (from
    where a partial copy stopped), settle again; a file still broken is copied again whole."""
    started = time.monotonic()
    settled = settle(wanted)
    broken = list(settled.broken)
    missing = dict(settled.missing)
    received = Received()
    received.resumed = sum(1 for offset in missing.values() if offset)
    on_total(sum(wanted[name].size - offset for name, offset in missing.items()))
    for attempt in range(ATTEMPTS):
        if not missing:
            break
        for name, offset in sorted(missing.items()):
            try:
                copy_file(origin, target, name, wanted[name], offset, on_bytes)
            except OriginBroken as exc:
                raise type(exc)(f"model {model}: {exc}") from None
            except (OSError, EOFError, paramiko.SSHException, RemoteHostError) as exc:
                # paramiko raises a bare EOFError when the connection drops
                reason = str(exc) or "the connection was lost"
                raise ModelUnavailableError(
                    f"model {model} on {target.label}: copying {name} from {origin.label} "
                    f"failed ({reason}); start again to resume it"
                ) from None
            received.files += 1
            received.bytes += wanted[name].size - offset
        settled = settle({name: wanted[name] for name in missing})
        broken += settled.broken
        missing = dict.fromkeys(settled.missing, 0)
        if missing and attempt + 1 < ATTEMPTS:
            on_total(sum(wanted[name].size for name in missing))
    if missing:
        raise ModelUnavailableError(
            f"model {model} on {target.label}: {', '.join(sorted(missing)[:3])} copied from "
            f"{origin.label} twice and still not matching the hub's hash there; check that "
            "host's disk"
        )
    received.broken = tuple(sorted(set(broken)))
    received.seconds = time.monotonic() - started
    return received
