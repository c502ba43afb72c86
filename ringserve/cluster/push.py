"""Copy the project to a host over SFTP, sending only the files that changed since last time
and removing the ones an earlier push sent that the project no longer has."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import paramiko
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from ringserve.cluster.ssh import SshSession
from ringserve.errors import RemoteHostError

log = logging.getLogger(__name__)

MANIFEST = ".ringserve-manifest.json"
# Never `.env`: it may hold the API keys, and remote ranks get their settings from the
# environment their launch gives them.
TOP_FILES = ("server.py", "api.py", "launch.py", "pyproject.toml", "hosts.json")
# What a push creates is the user's alone (group and others get nothing).
FILE_MODE_MASK = 0o700
DIR_MODE = 0o700
TREES = ("ringserve", "scripts")
SKIPPED_DIRS = {"__pycache__", "tests", ".venv", ".ringserve", ".pytest_cache", ".mypy_cache"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class PushSummary:
    host: str
    files_total: int
    files_sent: int
    bytes_sent: int
    files_removed: int
    seconds: float


def project_files(project_dir: Path) -> list[str]:
    """The files a host needs, as sorted POSIX paths relative to the project directory."""
    found = [name for name in TOP_FILES if (project_dir / name).is_file()]
    for tree in TREES:
        for directory, subdirs, files in os.walk(project_dir / tree):
            subdirs[:] = sorted(
                d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith(".")
            )
            base = Path(directory)
            for name in files:
                if _wanted(name) and (base / name).is_file():
                    found.append((base / name).relative_to(project_dir).as_posix())
    return sorted(found)


def _wanted(name: str) -> bool:
    if name.endswith(SKIPPED_SUFFIXES) or name.startswith("."):
        return False
    return not (name.startswith("test_") and name.endswith(".py"))


def file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(digest.hexdigest(), size)


def files_to_send(
    local: dict[str, FileEntry], manifest: dict[str, FileEntry], remote_sizes: dict[str, int]
) -> list[str]:
    """Files whose hash differs from the last push, or whose remote size no longer matches it."""
    return sorted(
        name
        for name, entry in local.items()
        if manifest.get(name) != entry or remote_sizes.get(name) != entry.size
    )


def push_project(
    session: SshSession, workdir: str, project_dir: Path, show_progress: bool = True
) -> PushSummary:
    """Bring `workdir` on the host up to date with the project; log one summary line."""
    started = time.monotonic()
    local = {name: file_entry(project_dir / name) for name in project_files(project_dir)}
    root = PurePosixPath(workdir)
    sftp = session.sftp()
    try:
        made: set[str] = set()
        _makedirs(sftp, root, made)
        manifest = _read_manifest(sftp, root / MANIFEST)
        unchanged = [name for name, entry in local.items() if manifest.get(name) == entry]
        sizes = _remote_sizes(sftp, root, unchanged)
        sending = files_to_send(local, manifest, sizes)
        total_bytes = sum(local[name].size for name in sending)
        with _progress(show_progress) as progress:
            task = progress.add_task(f"push {session.label}", total=total_bytes)
            for name in sending:
                target = root / name
                _makedirs(sftp, target.parent, made)
                sent_before = progress.tasks[task].completed

                def advance(done: int, _total: int, base: float = sent_before) -> None:
                    progress.update(task, completed=base + done)

                _put(sftp, project_dir / name, target, advance)
        # Only files the manifest lists: anything else in the workdir is not ours to delete.
        removing = sorted(set(manifest) - set(local))
        for name in removing:
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(str(root / name))
        _write_manifest(sftp, root / MANIFEST, local)
    except (OSError, paramiko.SSHException) as exc:
        raise RemoteHostError(
            f"{session.label}: pushing the project to {workdir} failed ({exc}); check the "
            "host's workdir in RINGSERVE_HOSTS or RINGSERVE_REMOTE_WORKDIR and its free space"
        ) from None
    finally:
        sftp.close()
    summary = PushSummary(
        host=session.label,
        files_total=len(local),
        files_sent=len(sending),
        bytes_sent=total_bytes,
        files_removed=len(removing),
        seconds=time.monotonic() - started,
    )
    log.info(
        "%s: pushed %d of %d files (%d bytes) to %s, removed %d, in %.1f s",
        summary.host,
        summary.files_sent,
        summary.files_total,
        summary.bytes_sent,
        workdir,
        summary.files_removed,
        summary.seconds,
    )
    return summary


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not show,
    )


def _makedirs(sftp: paramiko.SFTPClient, directory: PurePosixPath, made: set[str]) -> None:
    missing: list[PurePosixPath] = []
    current = directory
    while str(current) not in made and str(current) not in (".", "/"):
        try:
            if not stat.S_ISDIR(sftp.stat(str(current)).st_mode or 0):
                raise NotADirectoryError(f"{current} exists and is not a directory")
            break
        except FileNotFoundError:
            missing.append(current)
            current = current.parent
    for path in reversed(missing):
        sftp.mkdir(str(path), DIR_MODE)
    made.update(str(p) for p in [directory, *directory.parents])


def _read_manifest(sftp: paramiko.SFTPClient, path: PurePosixPath) -> dict[str, FileEntry]:
    try:
        with sftp.open(str(path), "r") as handle:
            raw = json.loads(handle.read())
        return {name: FileEntry(e["sha256"], int(e["size"])) for name, e in raw.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring the unreadable manifest %s; sending every file", path)
        return {}


def _remote_sizes(
    sftp: paramiko.SFTPClient, root: PurePosixPath, names: Iterable[str]
) -> dict[str, int]:
    sizes = {}
    for name in names:
        try:
            sizes[name] = sftp.stat(str(root / name)).st_size or 0
        except FileNotFoundError:
            continue
    return sizes


def _put(
    sftp: paramiko.SFTPClient,
    source: Path,
    target: PurePosixPath,
    callback: Callable[[int, int], None],
) -> None:
    temporary = f"{target}.{os.getpid()}.part"
    with sftp.open(temporary, "w") as handle:
        handle.chmod(0o600)
    sftp.put(str(source), temporary, callback=callback)
    sftp.chmod(temporary, stat.S_IMODE(source.stat().st_mode) & FILE_MODE_MASK)
    sftp.posix_rename(temporary, str(target))


def _write_manifest(
    sftp: paramiko.SFTPClient, path: PurePosixPath, entries: dict[str, FileEntry]
) -> None:
    body = {name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(entries.items())}
    write_remote_text(sftp, str(path), json.dumps(body, indent=1))


def write_remote_text(sftp: paramiko.SFTPClient, path: str, text: str) -> None:
    """Write a whole file at once: readers see the old content or the new, never half."""
    target = PurePosixPath(path)
    _makedirs(sftp, target.parent, set())
    temporary = f"{target}.{os.getpid()}.part"
    with sftp.open(temporary, "w") as handle:
        handle.chmod(0o600)
        handle.write(text)
    sftp.posix_rename(temporary, str(target))
