"""Shared fixtures: a tiny demo world on disk and a way to run the CLIs as a user would."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from misc import cli, config
from misc.data import demo
from misc.config import TrainConfig
from misc.store import checkpoint
from misc.store.checkpoint import atomic_save
from models.config import ModelConfig
from models.joint import Model, build_model

ROOT = Path(__file__).resolve().parent.parent


def launch_rank(script: str, args: list[str], rank: int = 0, world: int = 1) -> subprocess.Popen:
    """A CLI of the repository started as rank ``rank`` of ``world`` (RANK and WORLD_SIZE as torchrun sets them, one
    thread, the CPU), its output captured: a rank to kill, or to wait for with :func:`finish`."""
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args, "--no-progress", "--device", "cpu",
                             "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen) -> str:
    """The output of a process of :func:`launch_rank`, which must succeed."""
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output
TINY_MODEL = ["--set", "model.maps_dim=32", "--set", "model.embed_dim=32", "--set", "model.sru_layers=1",
              "--set", "train.crop_size=64", "--set", "train.eval_size=64", "--set", "train.batch_size=8",
              "--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo world small enough for tests: 48 train, 12 val, 12 test images of 64x64."""
    root = tmp_path_factory.mktemp("world") / "demo"
    demo.generate(root, seed=3, sizes={"train": 48, "val": 12, "test": 12}, image_size=64)
    return root


def run_cli(script: str, *args: str, world: Path | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args`` from the repo root, the demo world relocated to ``world``."""
    environment = {**os.environ, **(env or {})}
    if world is not None:
        environment["DSVE_DEMO_DIR"] = str(world)
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def random_checkpoint(path: Path, model_config: ModelConfig, world: Path, test_size: int) -> Path:
    """A checkpoint of ``model_config`` with random weights (the global seed's), trained on nothing, reading the
    demo ``world``'s word vectors and evaluating at ``test_size``."""
    settings = {"model": asdict(model_config), "train": asdict(TrainConfig(dataset="demo", test_size=test_size)),
                "word_vectors": str(world / "words" / "demo_word2vec.bin")}
    weights = build_model(model_config).state_dict()
    atomic_save({"format": "dsve-loc", "version": 1, "config": settings, "model": weights, "epoch": 0,
                 "best_rsum": 0.0, "metrics": {}}, path)
    return path


def load_model(path: Path) -> Model:
    """The network of the checkpoint at ``path`` with its weights, on the CPU in eval mode."""
    return checkpoint.model_from(checkpoint.load(path), path)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once per session (slow tests only: about 5 s)."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def build_wheel(folder: Path) -> Path:
    """Build the project's wheel offline into ``folder`` from a copy of the tree (an in-tree build would leave
    build/ in the checkout); the copy leaves out the top-level folders that are no part of the package."""
    def ignore(where: str, names: list[str]) -> set[str]:
        top = {"data", "runs", "tests", "bench", "build"} if Path(where) == ROOT else set()
        return {name for name in names if name.startswith(".") or name == "__pycache__" or name in top
                or name.endswith(".egg-info")}

    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=ignore)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                             folder / "wheel", source], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (folder / "wheel").glob("dsve_loc-*.whl")
    return wheel


def run_in_process(script: str, args: list, world: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a CLI's ``main`` through misc.cli.run in this process (no interpreter start-up), the demo world at
    ``world``; returns the exit status."""
    for key, path in list(config.DEMO_PATHS.items()):
        monkeypatch.setitem(config.DEMO_PATHS, key, world / path.relative_to(config.DEMO_DIR))
    monkeypatch.setattr(config, "DEMO_DIR", world)
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        cli.run(module.main, [str(arg) for arg in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
