"""The one results record every evaluator writes (docs/results.md, docs/results.schema.json): which tool and
version, which checkpoint (path and SHA-256), which data at which size under which protocol, and the metrics, every
rate in percent. ``--json`` gets the record plus the evaluator's rows; ``--results FILE --results-key KEY`` stores
the same record (without the rows) in a shared results file.

Light to import (standard library only): ``eval_retrieval.py --features`` builds its record without torch.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from misc.store.files import update_results, write_json
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


def save(entry: dict[str, Any], json_path: Path | None, results_path: Path | None, results_key: str,
         rows: dict[str, Any] | None = None) -> None:
    """Write ``entry`` to ``json_path`` (with ``rows``, the per-item results, when given) and set it under
    ``results_key`` (dotted keys nest) of the shared ``results_path``; either may be None."""
    if json_path:
        write_json(json_path, {**entry, **(rows or {})})
    if results_path:
        update_results(results_path, results_key, entry)
