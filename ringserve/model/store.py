"""A hub model in this host's Hugging Face cache, as `start` copies it between hosts: which files
of a snapshot the host holds, each with its size and the hub's hash of it (the name
huggingface_hub gives its blob: the sha256 of an LFS file, the git blob id of any other), and
putting received files in place the way huggingface_hub lays them out (`blobs/<hash>`,
`snapshots/<commit>/<name>` a link to it, `refs/<revision>`), so its own lookups find them.

Received files are checked against that hash here, on the host that stores them. A file once
checked is recorded (its size and modification time) so that later starts check it again only
if it changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ringserve.config.settings import PROJECT_DIR

SHA256 = re.compile(r"^[0-9a-f]{64}$")
GIT_BLOB = re.compile(r"^[0-9a-f]{40}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
PARTIAL = ".incomplete"  # huggingface_hub's own suffix: a download of it resumes there too
CHUNK = 8 << 20
# Where this host records the blobs it checked (the project's own state, not the cache's).
RECORD = PROJECT_DIR / ".ringserve" / "verified-blobs.json"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CachedFile(Message):
    """A file of a snapshot: its size and the hub's hash (None where the cache keeps no link
    to a named blob, e.g. with symlinks disabled)."""

    size: int
    etag: str | None = None


class Holding(Message):
    """What this host's cache holds of a hub model at a revision."""

    repo_dir: str  # models--org--name in this host's hub cache, whether it exists yet or not
    commit: str | None = None  # the snapshot found (None: none)
    files: dict[str, CachedFile] = {}
    checked: tuple[str, ...] = ()  # files whose blob was checked and has not changed since
    free: int = 0  # bytes free on the cache's disk


class Settled(Message):
    """What `settle` found of the wanted files: in place, or still to receive (from the offset
    a partial copy reached), and which were broken (and removed)."""

    placed: tuple[str, ...] = ()
    missing: dict[str, int] = {}
    broken: tuple[str, ...] = ()


def repo_dir(name: str) -> Path:
    # Imported here: `launch.py prepare-model` sets HF_HOME before huggingface_hub reads it.
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")


def blob_path(repo: Path, etag: str) -> Path:
    return repo / "blobs" / etag


def partial_path(repo: Path, etag: str) -> Path:
    return repo / "blobs" / f"{etag}{PARTIAL}"


def snapshot_files(snapshot: Path) -> dict[str, CachedFile]:
    """The snapshot's files (its top level, where mlx-lm reads), each with its blob's name."""
    found: dict[str, CachedFile] = {}
    for entry in sorted(snapshot.iterdir()):
        if not entry.is_file():  # a directory, or a link to a blob that is gone
            continue
        etag = None
        if entry.is_symlink():
            target = Path(os.readlink(entry))
            if target.parent.name == "blobs":
                etag = target.name
        found[entry.name] = CachedFile(size=entry.stat().st_size, etag=etag)
    return found


def disk_free(path: Path) -> int:
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def holding(name: str, snapshot: Path | None) -> Holding:
    """What the cache holds, given the snapshot huggingface_hub's lookup found (or None)."""
    repo = repo_dir(name)
    if snapshot is None or not snapshot.is_dir():
        return Holding(repo_dir=str(repo), free=disk_free(repo))
    files = snapshot_files(snapshot)
    record = read_record()
    checked = tuple(
        file
        for file, cached in files.items()
        if cached.etag and unchanged(record, blob_path(repo, cached.etag), cached.etag)
    )
    return Holding(
        repo_dir=str(repo), commit=snapshot.name, files=files, checked=checked, free=disk_free(repo)
    )


def hash_kind(etag: str) -> str | None:
    """How the hub hashed a file whose ETag is `etag`: sha256 (LFS) or a git blob id."""
    if SHA256.match(etag):
        return "sha256"
    if GIT_BLOB.match(etag):
        return "git-blob"
    return None


def matches(path: Path, etag: str, size: int) -> bool:
    """Whether the file is `size` bytes long and hashes to `etag` (size alone where the ETag is
    of no known kind)."""
    if path.stat().st_size != size:
        return False
    kind = hash_kind(etag)
    if kind is None:
        return True
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == etag


def read_record() -> dict[str, dict[str, object]]:
    try:
        found = json.loads(RECORD.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _stamp(blob: Path, etag: str) -> dict[str, object]:
    stat = blob.stat()
    return {"etag": etag, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def unchanged(record: Mapping[str, dict[str, object]], blob: Path, etag: str) -> bool:
    try:
        return record.get(str(blob.resolve())) == _stamp(blob, etag)
    except OSError:
        return False


def write_record(record: Mapping[str, dict[str, object]]) -> None:
    path = RECORD
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def link(repo: Path, commit: str, name: str, etag: str) -> None:
    """snapshots/<commit>/<name> -> ../../blobs/<etag>, as huggingface_hub links it."""
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    pointer = snapshot / name
    target = os.path.relpath(blob_path(repo, etag), snapshot)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    temporary = snapshot / f".{name}.{os.getpid()}.link"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, pointer)


def write_ref(repo: Path, revision: str, commit: str) -> None:
    """refs/<revision> names the commit, so a lookup by branch or tag finds the snapshot."""
    if COMMIT.match(revision):
        return
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text() == commit:
        return
    temporary = ref.with_name(f".{ref.name}.{os.getpid()}")
    temporary.write_text(commit)
    os.replace(temporary, ref)


def settle(
    name: str, commit: str, revision: str, wanted: Mapping[str, CachedFile], workers: int = 4
) -> Settled:
    """Put every wanted file whose blob is here and whole in the snapshot (checking its hash
    unless this host checked it before and it has not changed); remove a blob that does not
    match; say where each other file's copy stands."""
    repo = repo_dir(name)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    record = read_record()

    def check(item: tuple[str, CachedFile]) -> tuple[str, bool | None]:
        """True: in place; False: broken (removed); None: not here."""
        file, cached = item
        assert cached.etag is not None
        blob = blob_path(repo, cached.etag)
        if not blob.is_file():
            return file, None
        if unchanged(record, blob, cached.etag) or matches(blob, cached.etag, cached.size):
            return file, True
        blob.unlink()
        return file, False

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcome = dict(pool.map(check, wanted.items()))
    placed, broken, missing = [], [], {}
    for file, cached in wanted.items():
        assert cached.etag is not None
        if outcome[file]:
            link(repo, commit, file, cached.etag)
            record[str(blob_path(repo, cached.etag).resolve())] = _stamp(
                blob_path(repo, cached.etag), cached.etag
            )
            placed.append(file)
            continue
        if outcome[file] is False:
            broken.append(file)
        partial = partial_path(repo, cached.etag)
        offset = partial.stat().st_size if partial.is_file() else 0
        if offset > cached.size:  # not a prefix of this file: start again
            partial.unlink()
            offset = 0
        missing[file] = offset
    with contextlib.suppress(OSError):
        write_record({path: stamp for path, stamp in record.items() if os.path.exists(path)})
    if not missing:
        write_ref(repo, revision, commit)
    return Settled(placed=tuple(placed), missing=missing, broken=tuple(broken))
