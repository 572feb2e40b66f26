"""The console scripts ``pip install .`` puts on PATH (pyproject.toml [project.scripts], ``dsve-*``): each is
``misc.commands:SCRIPT`` and runs that top-level script's ``main`` through :func:`misc.cli.run`, so that a user
mistake is one ``error:`` line and exit status 2, as with ``python SCRIPT.py``. The script is imported only when
its command runs."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

from misc.cli import run

SCRIPTS = ("train", "eval_retrieval", "pointing_game", "semantic_seg", "localize", "search",
           "image_features_extraction", "text_features_extraction", "export", "app")


def run_script(module: str) -> None:
    """Run ``module.main`` with the command line's arguments."""
    run(importlib.import_module(module).main)


def __getattr__(name: str) -> Callable[[], None]:
    """``misc.commands.SCRIPT``: the console entry point of one of :data:`SCRIPTS` (PEP 562)."""
    if name in SCRIPTS:
        return partial(run_script, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
