"""What every command-line script shares: logging, device flags, one-line errors, atomic JSON results."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from misc.config import ConfigError
from misc.files import atomic_path


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                        help="mixed precision on CUDA (bare --amp means bf16); ignored on the CPU")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(main: Callable[[], Any]) -> None:
    """Run a CLI's ``main``; user mistakes print one line ``error: ...`` and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    try:
        main()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
