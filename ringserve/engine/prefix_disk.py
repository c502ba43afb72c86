"""One rank's prefix-cache entries on disk: a file per entry, holding this rank's shard only.

Files are mlx-lm prompt-cache files (`save_prompt_cache`) named `<key>-<ident>-<crc32>` (the
key is when the index stored the entry, the ident what it holds): written under a temporary
name and renamed, so a crash mid-write leaves no file that passes for an entry, and checked
against the CRC in their name when read back, so a file damaged later is caught. The header
says what the entry is (its tokens and owner) and what made it (model, layout, rank, KV format:
the fingerprint); a file another fingerprint made is removed at start. The directory is the
user's alone (0700, files 0600).

Writes run on a thread of their own (a turn's KV can be large), in the order the entries were
stored: the model's thread prepares each file (`cache_file`) and the writer, which calls no
MLX, writes it. An entry read back before its file is written is served from the cache in hand.
Which entries exist is the index's decision, taken alike on every rank; this store only carries
it out for this rank's files.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import zlib
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache
from safetensors import safe_open

from ringserve.engine.cache_file import FileParts, file_parts, write_parts
from ringserve.engine.kv_format import cache_arrays
from ringserve.engine.prefix_index import Owner, entry_ident

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a file holds changes
META_KEY = "ringserve"
SUFFIX = ".safetensors"
PART = ".part"  # a temporary file: `.<key>-<ident>.part.safetensors`
DIR_MODE = 0o700
FILE_MODE = 0o600
CRC_CHUNK = 16 << 20


@dataclass(frozen=True)
class Found:
    """An entry file this rank holds, as its header describes it."""

    key: int
    ident: int
    tokens: tuple[int, ...]
    owner: Owner
    path: Path


@dataclass
class _Write:
    key: int
    ident: int
    cache: list[Any]
    parts: FileParts
    cancelled: bool = False


def private_directory(path: Path) -> Path:
    """`path` made readable by the user alone, and any parent it needs made so too."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def file_crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _name(key: int, ident: int) -> str:
    return f"{key:016x}-{ident:016x}"


def _parse_name(name: str) -> tuple[int, int, int] | None:
    """(key, ident, crc) from an entry file's name; None if it is not one."""
    parts = name.removesuffix(SUFFIX).split("-")
    if not name.endswith(SUFFIX) or len(parts) != 3:
        return None
    try:
        return int(parts[0], 16), int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None


def encode_tokens(tokens: Sequence[int]) -> str:
    return base64.b64encode(np.asarray(tokens, dtype="<i4").tobytes()).decode()


def decode_tokens(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in np.frombuffer(base64.b64decode(text), dtype="<i4"))


class DiskStore:
    def __init__(self, directory: Path, fingerprint: Mapping[str, object]) -> None:
        self.directory = private_directory(directory)
        self.fingerprint = dict(fingerprint)
        self.bytes_held = 0  # the entry files' sizes (a file being written not yet)
        self.write_failures = 0
        self._files: dict[int, Path] = {}
        self._pending: dict[int, _Write] = {}
        self._queue: deque[int] = deque()
        self._changed = threading.Condition()
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="prefix-disk", daemon=True)
        self._writer.start()

    # --- start: what this rank holds --------------------------------------------------------
    def scan(self) -> list[Found]:
        """The entries this rank's directory holds for this fingerprint. Every other file of
        ours goes (half-written, unreadable, truncated, or made for another model, layout, rank
        or KV format), said in one log line."""
        found: list[Found] = []
        removed: Counter[str] = Counter()
        for path in sorted(self.directory.iterdir()):
            if not path.name.endswith(SUFFIX) or not path.is_file():
                continue
            if path.name.startswith("."):
                reason = "half-written"
            else:
                entry, reason = self._describe(path)
                if entry is not None:
                    found.append(entry)
                    self._files[entry.key] = path
                    self.bytes_held += path.stat().st_size
                    continue
            path.unlink(missing_ok=True)
            removed[reason] += 1
        gone = ", ".join(f"{count} {why}" for why, count in sorted(removed.items()))
        log.info(
            "prefix cache on disk (%s): %d entries found%s",
            self.directory,
            len(found),
            f"; removed {gone}" if gone else "",
        )
        return found

    def _describe(self, path: Path) -> tuple[Found | None, str]:
        named = _parse_name(path.name)
        if named is None:
            return None, "not named as an entry"
        try:
            with safe_open(str(path), "numpy") as handle:
                header = handle.metadata() or {}
            meta = json.loads(next(v for k, v in header.items() if k.endswith(META_KEY)))
            tokens = decode_tokens(meta["tokens"])
            owner = Owner(str(meta["scope"]), meta["conversation"])
        except Exception:  # any way a header can be damaged
            return None, "unreadable or truncated"
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            return None, "made for another model, layout, rank or KV format"
        key, ident, _ = named
        if (meta.get("key"), meta.get("ident")) != (key, ident) or ident != entry_ident(
            tokens, owner
        ):
            return None, "unreadable or truncated"
        return Found(key, ident, tokens, owner, path), ""

    # --- serving: write, read, delete -------------------------------------------------------
    def write(self, key: int, tokens: Sequence[int], owner: Owner, cache: list[Any]) -> None:
        """Queue the entry's file (prepared here, on the model's thread); `cache` must not
        change from now on."""
        parts = self.file_parts(cache, key, tokens, owner)
        job = _Write(key, entry_ident(tokens, owner), cache, parts)
        with self._changed:
            self._pending[key] = job
            self._queue.append(key)
            self._changed.notify_all()

    def read(self, key: int) -> list[Any] | None:
        """The entry's cache, or None when its file is missing or damaged (then removed, with
        a log line). Never raises: every rank must reach the agreement that follows."""
        with self._changed:
            job = self._pending.get(key)
            if job is not None and not job.cancelled:
                return job.cache
            path = self._files.get(key)
        if path is None:
            log.warning("prefix cache: entry %016x has no file on this rank", key)
            return None
        try:
            named = _parse_name(path.name)
            if named is None or file_crc(path) != named[2]:
                raise ValueError("its checksum does not match")
            cache: list[Any] = load_prompt_cache(str(path))
            mx.eval(cache_arrays(cache))
            return cache
        except Exception as exc:
            log.warning("prefix cache: removed %s, which cannot be read back (%s)", path, exc)
            self.delete(key)
            return None

    def delete(self, key: int) -> None:
        with self._changed:
            job = self._pending.get(key)
            if job is not None:
                job.cancelled = True  # the writer skips it, or removes what it wrote
            path = self._files.pop(key, None)
        if path is not None:
            self._unlink(path)

    def delete_all(self) -> None:
        with self._changed:
            keys = [*self._pending, *self._files]
        for key in keys:
            self.delete(key)

    def _unlink(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            with self._changed:
                self.bytes_held -= size

    # --- the writer thread ------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if self._closing:  # after `close` waited for the queue: what is left is lost
                    return
                job = self._pending[self._queue.popleft()]
            path = None if job.cancelled else self._write_file(job)
            with self._changed:
                del self._pending[job.key]
                if path is not None and not job.cancelled:
                    self._files[job.key] = path
                    self.bytes_held += path.stat().st_size
                self._changed.notify_all()
            if path is not None and job.cancelled:
                path.unlink(missing_ok=True)

    def _write_file(self, job: _Write) -> Path | None:
        stem = _name(job.key, job.ident)
        part = self.directory / f".{stem}{PART}{SUFFIX}"
        try:
            write_parts(part, job.parts)
            os.chmod(part, FILE_MODE)
            final = self.directory / f"{stem}-{file_crc(part):08x}{SUFFIX}"
            os.replace(part, final)
            return final
        except Exception as exc:  # a full disk, a vanished directory: the entry is not kept
            self.write_failures += 1
            log.warning("prefix cache: could not write %s (%s)", part, exc)
            part.unlink(missing_ok=True)
            return None

    def file_parts(
        self, cache: list[Any], key: int, tokens: Sequence[int], owner: Owner
    ) -> FileParts:
        """An entry's file as the store writes it: the cache, and a header saying what the
        entry is and what made it."""
        meta = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "key": key,
            "ident": entry_ident(tokens, owner),
            "scope": owner.scope,
            "conversation": owner.conversation,
            "tokens": encode_tokens(tokens),
        }
        return file_parts(cache, {META_KEY: json.dumps(meta)})

    def save(
        self, path: Path, cache: list[Any], key: int, tokens: Sequence[int], owner: Owner
    ) -> None:
        """Write one entry file at `path` now (0600)."""
        write_parts(path, self.file_parts(cache, key, tokens, owner))
        os.chmod(path, FILE_MODE)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued file is written (or `timeout` passes)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop the writer."""
        written = self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if not written:
            log.warning("prefix cache: stopped with entries not yet written to disk")
        self._writer.join(timeout=1.0)
