"""A JPEG cut short in a named dataset (issue 27): the demo world's images are only checked to exist before a run,
so a bad one is met where it is decoded. A training epoch replaces it and validation leaves it out; every evaluator
leaves it out; each counts it in its record, and the numbers are those of the split without it (the same commands
on a copy of the world whose split file does not hold the cut images)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from misc import config
from misc.data.datasets import load_records
from misc.data.decoded import Undecodable
from misc.data.words import load_word_vectors
from misc.eval.encode import score_records
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import TINY_MODEL, run_in_process

CUT_SPLITS = ("train", "val", "test")  # the first image of each split is cut short


def karpathy_entries(world: Path) -> list[dict]:
    return json.loads((world / "dataset_coco.json").read_text())["images"]


def image_file(world: Path, entry: dict) -> Path:
    return world / "images" / entry["filepath"] / entry["filename"]


@pytest.fixture(scope="module")
def worlds(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict]]:
    """The tiny demo world with the first image of each split cut short (a copy: tiny_world is shared), a copy of
    that world whose split file leaves those images out, and the cut entries by split."""
    cut = tmp_path_factory.mktemp("cut") / "demo"
    shutil.copytree(tiny_world, cut)
    entries = {split: next(e for e in karpathy_entries(cut) if e["split"] == split) for split in CUT_SPLITS}
    for entry in entries.values():
        path = image_file(cut, entry)
        with Image.open(path) as image:
            image.convert("RGB").save(path, format="JPEG", quality=95)  # a real JPEG of the scene
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])  # the scan stops half way
        with Image.open(path) as image:
            image.verify()  # what a presence or header check sees: nothing wrong
    removed = tmp_path_factory.mktemp("removed") / "demo"
    shutil.copytree(cut, removed)
    split_file = json.loads((removed / "dataset_coco.json").read_text())
    cut_ids = {entry["cocoid"] for entry in entries.values()}
    split_file["images"] = [e for e in split_file["images"] if e["cocoid"] not in cut_ids]
    (removed / "dataset_coco.json").write_text(json.dumps(split_file))
    return cut, removed, entries


def listed(unreadable: dict) -> list[str]:
    """The file names an ``unreadable_images`` object lists, its count checked against its list."""
    assert unreadable["count"] == len(unreadable["images"])
    assert all("truncated" in entry["reason"] for entry in unreadable["images"])
    return [Path(entry["image"]).name for entry in unreadable["images"]]


def evaluate(script: str, args: list, world: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    assert run_in_process(script, [*args, "--json", out], world, monkeypatch) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_training_and_every_evaluator_leave_out_what_does_not_decode(worlds, tmp_path, monkeypatch, caplog):
    cut, removed, entries = worlds
    names = {split: entry["filename"] for split, entry in entries.items()}
    out = tmp_path / "run"
    train = ["--preset", "demo", "--epochs", "1", *TINY_MODEL, "--workers", "1", "--out", out]
    assert run_in_process("train.py", train, cut, monkeypatch) == 0  # the worker decodes, the main process counts
    state = torch.load(out / "last.pth.tar", map_location="cpu", weights_only=True)
    unreadable = state["metrics"]["unreadable_images"]
    assert {split: listed(unreadable[split]) for split in ("train", "val")} == {
        "train": [names["train"]], "val": [names["val"]]}
    assert f"train image {image_file(cut, entries['train'])} cannot be decoded" in caplog.text
    model = out / "last.pth.tar"
    common = ["-p", model, "--workers", "0", "--no-progress", "--device", "cpu"]

    # validation: the split without its cut image, as eval_retrieval ranks it from the world that never held it
    validated = evaluate("eval_retrieval.py", [*common, "--split", "val", "--size", "64", "--protocols", "full"],
                         removed, tmp_path / "val.json", monkeypatch)
    assert state["metrics"]["val"]["full"] == validated["metrics"]["full"]
    assert validated["unreadable_images"]["count"] == 0

    retrieval = {world: evaluate("eval_retrieval.py", [*common, "--split", "test", "--protocols", "full"], world,
                                 tmp_path / f"r_{world.parent.name}.json", monkeypatch) for world in (cut, removed)}
    assert listed(retrieval[cut]["unreadable_images"]) == [names["test"]]
    assert retrieval[cut]["metrics"] == retrieval[removed]["metrics"]
    assert retrieval[cut]["metrics"]["images"] == sum(e["split"] == "test" for e in karpathy_entries(cut)) - 1
    assert "1 of 12 images cannot be decoded and were left out" in caplog.text

    pointing = {world: evaluate("pointing_game.py", [*common, "--dataset", "demo", "--split", "test", "--size", "64",
                                                     "--per-phrase"], world, tmp_path / f"p_{world.parent.name}.json",
                                monkeypatch) for world in (cut, removed)}
    assert listed(pointing[cut]["unreadable_images"]) == [names["test"]]
    unscored = [row for row in pointing[cut]["skipped_phrases"] if "truncated" in row["reason"]]
    assert unscored and {row["image_id"] for row in unscored} == {entries["test"]["cocoid"]}
    assert pointing[cut]["per_phrase"] == pointing[removed]["per_phrase"]
    same = {key: value for key, value in pointing[cut]["metrics"].items() if key != "skipped"}
    assert same == {key: value for key, value in pointing[removed]["metrics"].items() if key != "skipped"}
    assert pointing[cut]["metrics"]["skipped"] == pointing[removed]["metrics"]["skipped"] + len(unscored)

    segmentation = {world: evaluate("semantic_seg.py", [*common, "--dataset", "demo", "--split", "test", "--size",
                                                        "64", "--per-image"], world,
                                    tmp_path / f"s_{world.parent.name}.json", monkeypatch) for world in (cut, removed)}
    assert listed(segmentation[cut]["unreadable_images"]) == [names["test"]]
    for key in ("metrics", "per_category", "per_image"):
        assert segmentation[cut][key] == segmentation[removed][key]
    assert segmentation[cut]["metrics"]["images"] == retrieval[cut]["metrics"]["images"]


def test_the_score_matrix_leaves_out_an_image_and_its_captions(worlds, monkeypatch):
    """The matchmap's max_img scores (no vectors: misc.eval.encode.score_records) of the test split with its cut
    image are those of the split without it, image rows and caption columns alike, and the image is counted."""
    cut, removed, entries = worlds
    words = load_word_vectors(cut / "words" / "demo_word2vec.bin")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="matchmap", trunk="resnet18", trunk_cut="layer2", region_dim=8,
                                    lstm_hidden=8, word_dim=words.dim, score="max_img"))
    scored, demo_paths = {}, dict(config.DEMO_PATHS)
    for world in (cut, removed):
        for key, path in demo_paths.items():
            monkeypatch.setitem(config.DEMO_PATHS, key, world / path.relative_to(config.DEMO_DIR))
        undecodable = Undecodable("image", "left out")
        scored[world] = (*score_records(model, load_records("demo", "test"), words, torch.device("cpu"), 64,
                                        batch_size=4, workers=0, progress=False, undecodable=undecodable),
                         undecodable.listed())
    (scores, owner, unreadable), (expected, expected_owner, none) = scored[cut], scored[removed]
    assert [Path(path).name for path, _ in unreadable] == [entries["test"]["filename"]] and none == []
    assert torch.equal(owner, expected_owner) and scores.shape == expected.shape == (11, len(owner))
    torch.testing.assert_close(scores, expected)
