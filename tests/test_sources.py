"""Every command's -p takes an export folder as it takes the checkpoint it was exported from (misc/store/source.py):
the same vectors, the same metrics, and a provenance digest that says which model made them. Every command that
runs a model takes the shared flags of misc/cli.py."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from misc.config import TrainConfig
from misc.errors import UserError
from misc.store import checkpoint
from misc.store.source import model_sha256
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import run_in_process

FLAGS = ["--no-progress", "--device", "cpu", "--threads", "1"]
LOADERS = ["--workers", "0"]  # the commands that load data in batches


@pytest.fixture(scope="module")
def sources(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight tiny checkpoint naming the tiny world's word vectors, and its export folder."""
    torch.manual_seed(0)
    model_config = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
    folder = tmp_path_factory.mktemp("sources")
    path = folder / "tiny.pth.tar"
    checkpoint.atomic_save({"format": "dsve-loc", "version": 1,
                            "config": {"model": asdict(model_config),
                                       "train": asdict(TrainConfig(dataset="demo", test_size=64)),
                                       "word_vectors": str(tiny_world / "words" / "demo_word2vec.bin")},
                            "model": build_model(model_config).state_dict(), "epoch": 0, "best_rsum": 0.0,
                            "metrics": {}}, path)
    checkpoint.export_file(path, folder / "exported")
    return {"checkpoint": path, "export": folder / "exported"}


def expected_sha256(source: Path) -> str:
    """The digest docs/results.md describes, worked out with hashlib alone: a file's bytes, or for a folder the
    ``sha256sum model.safetensors config.json`` listing."""
    if source.is_file():
        return hashlib.sha256(source.read_bytes()).hexdigest()
    listing = "".join(f"{hashlib.sha256((source / name).read_bytes()).hexdigest()}  {name}\n"
                      for name in ("model.safetensors", "config.json"))
    return hashlib.sha256(listing.encode()).hexdigest()


def record(path: Path) -> dict:
    """A results record without the two fields that name the model source."""
    return {key: value for key, value in json.loads(path.read_text()).items()
            if key not in ("checkpoint", "checkpoint_sha256")}


def npz(path: Path) -> dict:
    """An extraction's arrays, its config without the fields that name the model source and its word vectors."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key != "config"}
        found = json.loads(str(data["config"]))
    assert found["checkpoint_sha256"] == expected_sha256(Path(found["checkpoint"]))
    named = ("checkpoint", "checkpoint_sha256", "word_vectors")
    return {**arrays, "config": {key: value for key, value in found.items() if key not in named}}


def run(script: str, args: list, world: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the command in this process; its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_in_process(script, args, world, monkeypatch) == 0, script
    return out.getvalue()


# script: (arguments after -p SOURCE, given the output folder and the world; what to compare, given the folder)
COMMANDS = {
    "eval_retrieval.py": (lambda out, world: ["--protocols", "full", "--json", out / "r.json", *LOADERS],
                          lambda out, stdout: record(out / "r.json")),
    "pointing_game.py": (lambda out, world: ["--size", "64", "--limit", "3", "--json", out / "pg.json", *LOADERS],
                         lambda out, stdout: record(out / "pg.json")),
    "semantic_seg.py": (lambda out, world: ["--size", "64", "--limit", "3", "--json", out / "seg.json", *LOADERS],
                        lambda out, stdout: record(out / "seg.json")),
    "image_features_extraction.py": (lambda out, world: ["-d", world / "images" / "val2014", "-o", out / "i.npz",
                                                         *LOADERS],
                                     lambda out, stdout: npz(out / "i.npz")),
    "text_features_extraction.py": (lambda out, world: ["-d", out.parent / "lines.txt", "-o", out / "t.npz",
                                                        *LOADERS],
                                    lambda out, stdout: npz(out / "t.npz")),
    "search.py": (lambda out, world: ["--texts", out.parent / "lines.npz", "-q", "a red circle", "-k", "3",
                                      "--json", out / "s.json"],
                  lambda out, stdout: json.loads((out / "s.json").read_text())),
    "localize.py": (lambda out, world: ["-i", next((world / "images" / "val2014").glob("*.jpg")), "-t", "a red circle",
                                        "-t", "a blue square", "--size", "64", "-o", out / "l.png"],
                    lambda out, stdout: stdout.replace(str(out), "OUT")),
    "export.py": (lambda out, world: ["-o", out / "again"],
                  lambda out, stdout: {name: (out / "again" / name).read_bytes()
                                       for name in ("model.safetensors", "words.safetensors", "vocab.txt")}),
}


@pytest.mark.parametrize("script", COMMANDS)
def test_a_command_gives_the_same_output_from_a_checkpoint_and_from_its_export(script, sources, tiny_world, tmp_path,
                                                                               monkeypatch):
    arguments, output = COMMANDS[script]
    lines = tmp_path / "lines.txt"
    lines.write_text("a red circle\ntwo blue squares on the left\n", encoding="utf-8")
    if script == "search.py":  # a collection to search, made with the checkpoint
        run("text_features_extraction.py", ["-p", sources["checkpoint"], "-d", lines, "-o", tmp_path / "lines.npz",
                                            *FLAGS], tiny_world, monkeypatch)
    seen = {}
    for kind, source in sources.items():
        out = tmp_path / kind
        out.mkdir()
        flags = FLAGS if script != "export.py" else []  # exporting runs no model
        stdout = run(script, ["-p", source, *arguments(out, tiny_world), *flags], tiny_world, monkeypatch)
        seen[kind] = output(out, stdout)
        if script in ("eval_retrieval.py", "pointing_game.py", "semantic_seg.py"):
            written = json.loads(next(out.glob("*.json")).read_text())
            assert written["checkpoint_sha256"] == expected_sha256(source)
    if isinstance(seen["checkpoint"], str):
        assert seen["export"] == seen["checkpoint"]
        return
    assert seen["checkpoint"].keys() == seen["export"].keys()
    for key, value in seen["checkpoint"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(seen["export"][key], value, err_msg=f"{script}: {key}")
        else:
            assert seen["export"][key] == value, f"{script}: {key}"


def test_the_digest_of_an_export_is_its_weights_and_configuration(sources, tmp_path):
    export = sources["export"]
    assert model_sha256(export) == expected_sha256(export) != model_sha256(sources["checkpoint"])
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model.safetensors", "config.json"):
        (copy / name).write_bytes((export / name).read_bytes())
    assert model_sha256(copy) == model_sha256(export)  # the card and the words are not the model's identity
    (copy / "config.json").write_text((export / "config.json").read_text().replace('"epoch": 0', '"epoch": 1'))
    assert model_sha256(copy) != model_sha256(export)
    with pytest.raises(UserError, match="neither a checkpoint file nor an export folder"):
        model_sha256(tmp_path / "elsewhere")


RUNNERS = ("train", "eval_retrieval", "pointing_game", "semantic_seg", "localize", "search",
           "image_features_extraction", "text_features_extraction", "app")


@pytest.mark.parametrize("name", RUNNERS)
def test_every_command_that_runs_a_model_lists_the_shared_flags_alike(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    group = text[text.index("running the model:"):]
    for flag in ("--device DEVICE", "--amp [{bf16,fp16}]", "--threads THREADS", "--no-progress"):
        assert flag in group, f"{name}: {flag}"
