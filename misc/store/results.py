"""The one results record every evaluator writes (docs/results.md, docs/results.schema.json): which tool and
version, which checkpoint (path and SHA-256), which data at which size under which protocol, and the metrics, every
rate in percent. ``--json`` gets the record plus the evaluator's rows; ``--results FILE --results-key KEY`` stores
the same record (without the rows) in a shared results file. Rows may come from a :class:`Spool` (kept on disk as
they are made) and are written one at a time, so that millions of them never sit in memory.

Light to import (standard library only): ``eval_retrieval.py --features`` builds its record without torch.
"""
from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from misc.store.files import atomic_path, update_results
from misc.store.source import model_sha256

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "docs" / "results.schema.json"
PACKAGE = "dsve-loc"


@functools.cache
def package_version() -> str:
    """The installed package's version; in a clone without it, ``git describe`` of the clone; else "unknown"."""
    import importlib.metadata  # 15 ms of start-up that only a command writing a results record should pay

    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        described = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else "unknown"


def record(tool: str, *, checkpoint: Path | str | None, dataset: str | None, split: str | None, size: int | None,
           protocol: str | None, metrics: dict[str, Any], checkpoint_sha256: str | None = None,
           **extra: Any) -> dict[str, Any]:
    """The results record of one evaluation (the fields of docs/results.md, in that order, then ``extra``).

    The checkpoint (a file or an export folder) has its digest :func:`misc.store.source.model_sha256` read here
    (streamed, once per file version) unless ``checkpoint_sha256`` is given, e.g. from a feature file that
    recorded it.
    """
    if checkpoint is not None and checkpoint_sha256 is None:
        checkpoint_sha256 = model_sha256(checkpoint)
    return {"tool": tool, "version": package_version(), "checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_sha256": checkpoint_sha256, "dataset": dataset, "split": split, "size": size,
            "protocol": protocol, "metrics": metrics, **extra}


def unreadable_images(skipped: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The record's ``unreadable_images``: how many of the evaluated data's images could not be decoded and were
    left out (e.g. a JPEG cut short), and which, each with the decoder's reason."""
    return {"count": len(skipped), "images": [{"image": str(path), "reason": reason} for path, reason in skipped]}


def listed_images(unreadable: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The (path, reason) pairs of an :func:`unreadable_images` object (none for None)."""
    return [(entry["image"], entry["reason"]) for entry in (unreadable or {}).get("images", [])]


class Spool:
    """Rows kept on disk, not in memory: each appended as a JSON line to ``file``, read back one at a time by
    :meth:`rows`; :func:`spooled` makes one."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def add(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row added, in order."""
        self.file.seek(0)
        for line in self.file:
            yield json.loads(line)


@contextlib.contextmanager
def spooled() -> Iterator[Spool]:
    """A :class:`Spool` on an anonymous temporary file, gone when the block ends or the process dies."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as file:
        yield Spool(file)


def write_record(path: Path | str, entry: dict[str, Any], rows: dict[str, Iterable[Any]]) -> None:
    """``entry`` then each list of ``rows`` (a list or any iterable, e.g. :meth:`Spool.rows`) as one JSON object,
    written atomically: the record's fields indented, each row on a line of its own, one row in memory at a time."""
    head = json.dumps(entry, indent=2)
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as out:
        out.write(head[:-2])  # without the closing "\n}": the rows follow the record's fields
        for key, values in rows.items():
            out.write(f",\n  {json.dumps(key)}: [")
            for number, value in enumerate(values):
                out.write(f"{',' if number else ''}\n    {json.dumps(value)}")
            out.write("\n  ]")
        out.write("\n}\n")


def save(entry: dict[str, Any], json_path: Path | None, results_path: Path | None, results_key: str,
         rows: dict[str, Iterable[Any]] | None = None) -> None:
    """Write ``entry`` to ``json_path`` (with ``rows``, the per-item results, when given: lists or iterables,
    :func:`write_record`) and set it under ``results_key`` (dotted keys nest) of the shared ``results_path``;
    either may be None."""
    if json_path:
        write_record(json_path, entry, rows or {})
    if results_path:
        update_results(results_path, results_key, entry)
