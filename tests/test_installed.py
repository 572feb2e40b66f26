"""The package as a user installs it: the wheel in a fresh virtual environment, its dsve-* commands run from the
user's own folder. The demo trains, extracts, searches and localizes there, on the checkpoint and on its export;
data and runs land in that folder (misc/config.py: the working directory's data/ and runs/), and the
environment's site-packages is left as pip installed it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TINY_MODEL

FLAGS = ["--no-progress", "--device", "cpu"]


def files(folder: Path) -> set[str]:
    """Every file under ``folder``, bytecode caches aside (the interpreter may write those for any import)."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.mark.slow
def test_the_installed_commands_run_the_demo_from_the_users_folder(wheel, tiny_world, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The requirements (torch, ...) and pip come from this interpreter's environment: nothing is downloaded.
    (site / "requirements_from_the_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                                wheel], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    before = files(site)
    assert "misc/config.py" in before and (venv / "bin" / "dsve-train").is_file()

    work = tmp_path / "work"  # the user's folder: the tiny world where the demo world goes, so no full one is made
    shutil.copytree(tiny_world, work / "data" / "demo")
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("DSVE_") and key != "PYTHONPATH"}
    # sru's kernels, built once for the clone's runs (not a test of where the build goes: models/text.py decides)
    environment |= {"OMP_NUM_THREADS": "1",
                    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                           str(ROOT / ".cache" / "torch_extensions"))}

    def command(name: str, *args: object, where: Path = work) -> str:
        result = subprocess.run([venv / "bin" / name, *map(str, args)], cwd=where, env=environment,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name} {args}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    command("dsve-train", "--preset", "demo", "--epochs", "1", "--export", "exported", *TINY_MODEL)
    assert (work / "runs" / "demo" / "best.pth.tar").is_file() and (work / "exported" / "config.json").is_file()
    image = sorted((work / "data" / "demo" / "images" / "val2014").glob("*.jpg"))[0].relative_to(work)
    found = {}
    for name, source in (("checkpoint", "runs/demo/best.pth.tar"), ("export", "exported")):
        command("dsve-extract-images", "-p", source, "-d", "data/demo/images/val2014", "-o", f"{name}.npz",
                "--workers", "0", *FLAGS)
        command("dsve-search", "--images", f"{name}.npz", "-p", source, "-q", "a red circle", "-k", "3", "--json",
                f"{name}.json", *FLAGS)
        printed = command("dsve-localize", "-p", source, "-i", image, "-t", "a red circle", "--size", "64", "-o",
                          f"{name}.png", *FLAGS)
        with np.load(work / f"{name}.npz") as data:
            found[name] = (data["features"], json.loads((work / f"{name}.json").read_text())["queries"],
                           printed.split("\n", 1)[1])
    np.testing.assert_array_equal(found["export"][0], found["checkpoint"][0])
    assert found["export"][1:] == found["checkpoint"][1:]
    assert len(found["checkpoint"][1][0]["results"]) == 3 and "peak of 'a red circle'" in found["checkpoint"][2]

    # From another folder, whose data/ holds no word vectors, the checkpoint finds them where training saw them.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command("dsve-localize", "-p", work / "runs" / "demo" / "best.pth.tar", "-i", work / image, "-t", "a red circle",
            "--size", "64", "-o", "there.png", *FLAGS, where=elsewhere)
    assert (elsewhere / "there.png").is_file() and not (elsewhere / "data").exists()
    assert files(site) == before
