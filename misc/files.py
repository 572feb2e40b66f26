"""Atomic file writes: readers see the old file or the complete new one, never a partial one."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success rename it to ``path``, on failure remove it.

    The temporary file is created by the caller, so it gets the usual permissions (unlike ``mkstemp``'s 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def update_results(path: Path | str, key: str, value: Any) -> None:
    """Set ``key`` in a shared results JSON file (e.g. runs/demo/results.json), keeping the other entries."""
    path = Path(path)
    results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    results[key] = value
    write_json(path, results)
