"""``--help`` of every command imports no deep-learning or word-vector library: they are imported after the
arguments are parsed, so that help (and a mistyped flag) answers at once. Timings live in bench/, not here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMANDS = sorted(path.stem for path in ROOT.glob("*.py") if path.stem != "hubconf")  # every top-level command
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
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(name=name, heavy=HEAVY)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_help_names_the_library_defaults(capsys):
    """The localization commands write their defaults out in --help (reading them would import torch): the
    numbers, datasets and protocols they name are the ones misc/eval uses."""
    import localize
    import pointing_game
    import semantic_seg
    from misc.eval import pointing, segment
    from misc.eval.localization import PAPER_SIZE, POINTING_K, SEGMENTATION_K

    expected = {pointing_game: [f"{PAPER_SIZE} for the paper's", f"(default {POINTING_K},",
                                " | ".join(pointing.DATASETS)],
                localize: [f"{PAPER_SIZE} for the paper's", f"(default {POINTING_K},"],
                semantic_seg: [f"(default {SEGMENTATION_K},", "{" + ",".join(segment.PROTOCOLS) + "}"]}
    for module, phrases in expected.items():
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for phrase in phrases:
            assert phrase in text, (module.__name__, phrase)
