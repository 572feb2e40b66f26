"""Atomic file writes: readers see the old file or the complete new one, never a partial one; and a full disk, a
read-only folder or a permission error while writing is one line naming the file and what to do. Also a file's
SHA-256, streamed (and cached per file version)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from functools import cache
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from misc.errors import UserError

FULL = "free some space (or write to another disk) and run again"
DENIED = "write to a folder you may write to, or change this one's permissions"
# What the operating system said, and what to do, for the errors a user fixes outside the program.
WRITE_ERRORS = {errno.ENOSPC: ("no space left on the device", FULL),
                errno.EDQUOT: ("disk quota exceeded", FULL),
                errno.EFBIG: ("the file is larger than the file system or a limit allows", FULL),
                errno.EROFS: ("read-only file system", "write to another folder"),
                errno.EACCES: ("permission denied", DENIED),
                errno.EPERM: ("operation not permitted", DENIED)}


@contextlib.contextmanager
def writing(path: Path | str, temporary: Path | None = None) -> Iterator[None]:
    """Turn an ``OSError`` of :data:`WRITE_ERRORS` raised inside while writing ``path`` (a file or a folder), or
    its ``temporary`` file, into a one-line :class:`UserError` naming ``path``. Other errors pass unchanged, and so
    do errors about other files (an input read on the way)."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_ERRORS or not _about(Path(path), temporary, error.filename):
            raise
        what, advice = WRITE_ERRORS[error.errno]
        raise UserError(f"cannot write {path}: {what}; {advice}") from error


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success make it durable and rename it to ``path``, on
    failure remove it. Errors of :data:`WRITE_ERRORS` become a :class:`UserError` naming ``path``.

    The temporary file is created by the caller, so it gets the usual permissions (unlike ``mkstemp``'s 0600).
    Its bytes are flushed to the disk before the rename, and the folder after it, so that after a power cut
    ``path`` is the old file or the new one, never an empty one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    with writing(path, temporary):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield temporary
            _fsync(temporary)
            os.replace(temporary, path)
            _fsync(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):  # the first error is the one to report
                temporary.unlink(missing_ok=True)
            raise


def _about(path: Path, temporary: Path | None, filename: Any) -> bool:
    """Whether an error about ``filename`` (None: no file named, as for a failed write) concerns writing
    ``path``: the file itself, its temporary file, a folder above it (being created) or a file inside it."""
    if filename is None:
        return True
    other = Path(os.fsdecode(filename))
    return other == temporary or path.is_relative_to(other) or other.is_relative_to(path)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to the disk (a folder: its entries, e.g. a rename)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(descriptor)


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (a checkpoint of any size costs constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """:func:`file_sha256`, cached per file version (path, size, modification time)."""
    return file_sha256(path)


def sha256(path: Path | str) -> str:
    """The SHA-256 of a file, computed once per file version in a process."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def update_results(path: Path | str, key: str, value: Any) -> None:
    """Set ``key`` in a shared results JSON file (e.g. runs/demo/results.json), keeping the other entries; a
    dotted key (``models.dsve.retrieval``) sets a nested entry."""
    path = Path(path)
    results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    *parents, last = key.split(".")
    entry = results
    for name in parents:
        entry = entry.setdefault(name, {})
    entry[last] = value
    write_json(path, results)
