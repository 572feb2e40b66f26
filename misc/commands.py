"""The console scripts ``pip install .`` puts on PATH (pyproject.toml [project.scripts], ``dsve-*``): one function
a top-level script, which runs that script's ``main`` through :func:`misc.cli.run`, so that a user mistake is one
``error:`` line and exit status 2, as with ``python SCRIPT.py``. The script is imported only when its command runs,
so that one command's start-up never pays for another's libraries."""
from __future__ import annotations

import importlib

from misc.cli import run


def run_script(module: str) -> None:
    """Run the top-level script ``module``'s ``main`` with the command line's arguments."""
    run(importlib.import_module(module).main)


def train() -> None:
    """``dsve-train``: train.py."""
    run_script("train")


def eval_retrieval() -> None:
    """``dsve-eval-retrieval``: eval_retrieval.py."""
    run_script("eval_retrieval")


def pointing_game() -> None:
    """``dsve-pointing-game``: pointing_game.py."""
    run_script("pointing_game")


def semantic_seg() -> None:
    """``dsve-semantic-seg``: semantic_seg.py."""
    run_script("semantic_seg")


def localize() -> None:
    """``dsve-localize``: localize.py."""
    run_script("localize")


def search() -> None:
    """``dsve-search``: search.py."""
    run_script("search")


def image_features_extraction() -> None:
    """``dsve-extract-images``: image_features_extraction.py."""
    run_script("image_features_extraction")


def text_features_extraction() -> None:
    """``dsve-extract-texts``: text_features_extraction.py."""
    run_script("text_features_extraction")


def export() -> None:
    """``dsve-export``: export.py."""
    run_script("export")


def app() -> None:
    """``dsve-app``: app.py."""
    run_script("app")


def checkpoint() -> None:
    """``dsve-checkpoint``: checkpoint.py."""
    run_script("checkpoint")


def photo_world() -> None:
    """``dsve-photo-world``: photo_world.py."""
    run_script("photo_world")
