"""``--help`` of every command imports no deep-learning or word-vector library: they are imported after the
arguments are parsed, so that help (and a mistyped flag) answers at once. Timings live in bench/, not here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMANDS = ("train", "eval_retrieval", "pointing_game", "semantic_seg", "localize", "search",
            "image_features_extraction", "text_features_extraction", "export", "app", "checkpoint", "photo_world")
HEAVY = ("torch", "torchvision", "gensim", "sru")
# Runs the command's main(["--help"]) in a fresh interpreter, then prints the heavy modules it imported.
PROGRAM = """
import importlib, json, sys
module = importlib.import_module({name!r})
try:
    module.main(["--help"])
except SystemExit as exit_:
    assert not exit_.code, exit_.code
print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_help_imports_no_heavy_library(name):
    if not (ROOT / f"{name}.py").is_file():
        pytest.skip(f"{name}.py is not in this checkout yet")
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(name=name, heavy=HEAVY)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
