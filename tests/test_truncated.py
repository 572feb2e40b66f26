"""A JPEG cut short in one's own data (issue 27): its header reads, its pixels do not. It is found before anything
runs (one log line), and a training epoch with its validation and every evaluator run on splits that hold one."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from misc.data.datasets import load_records
from tests.conftest import TINY_MODEL, run_in_process
from tests.test_custom_data import SPLIT_OF, scene

CUT = {0: "train", 8: "val", 11: "test"}  # one image of each split becomes a truncated JPEG


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("truncated")
    lines = [scene(i, folder) for i in range(len(SPLIT_OF))]
    for index in CUT:
        whole = folder / f"{index}.jpg"
        Image.open(folder / f"{index}.png").save(whole, quality=95)
        data = whole.read_bytes()
        whole.write_bytes(data[:len(data) * 2 // 3])  # the scan stops two thirds of the way
        with Image.open(whole) as image:
            image.verify()  # what a header check sees: nothing wrong
        lines[index]["image"] = f"{index}.jpg"
    path = folder / "mine.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_the_truncated_images_are_known_before_anything_runs(world, caplog):
    with caplog.at_level(logging.WARNING):
        for index, split in CUT.items():
            kept = [record.image.name for record in load_records(str(world), split)]
            assert f"{index}.jpg" not in kept and len(kept) == SPLIT_OF.count(split) - 1
    assert sum("skipped 1 of" in record.message and "truncated" in record.message for record in caplog.records) == 3


def undecodable(record: dict) -> list[str]:
    """The image files a results record's ``unreadable_images`` names, its count checked against its list."""
    listed = record["unreadable_images"]
    assert listed["count"] == len(listed["images"]) and all("truncated" in i["reason"] for i in listed["images"])
    return sorted(Path(i["image"]).name for i in listed["images"])


def cut_in(split: str) -> list[str]:
    """The files this test cut short in ``split``, from CUT alone."""
    return sorted(f"{index}.jpg" for index, where in CUT.items() if where == split)


@pytest.mark.slow
def test_an_epoch_with_validation_and_every_evaluator_run_past_them(world, tmp_path, monkeypatch):
    """Each run counts the images it left out in its record (training: its checkpoint's metrics), as cut here."""
    out = tmp_path / "run"
    train = ["--preset", "demo", "--dataset", world, "--split", "train", "--val-split", "val", "--words",
             "glove-6b-50d", "--set", "model.word_dim=50", "--epochs", "1", *TINY_MODEL, "--batch-size", "4"]
    assert run_in_process("train.py", [*train, "--out", out], world.parent, monkeypatch) == 0
    model = out / "last.pth.tar"
    trained = torch.load(model, map_location="cpu", weights_only=True)["metrics"]["unreadable_images"]
    assert {split: undecodable({"unreadable_images": trained[split]}) for split in ("train", "val")} == {
        "train": cut_in("train"), "val": cut_in("val")}
    common = ["-p", model, "--dataset", world, "--split", "test", "--workers", "0", "--no-progress", "--device", "cpu"]
    assert run_in_process("eval_retrieval.py", [*common, "--protocols", "full", "--json", tmp_path / "r.json"],
                          world.parent, monkeypatch) == 0
    retrieval = json.loads((tmp_path / "r.json").read_text())
    assert retrieval["metrics"]["images"] == SPLIT_OF.count("test") - len(cut_in("test"))
    assert undecodable(retrieval) == cut_in("test") == ["11.jpg"]
    assert run_in_process("pointing_game.py", [*common, "--size", "64", "--json", tmp_path / "p.json"],
                          world.parent, monkeypatch) == 0
    pointing = json.loads((tmp_path / "p.json").read_text())
    assert undecodable(pointing) == cut_in("test") and pointing["metrics"]["images"] == SPLIT_OF.count("test") - 1
    assert run_in_process("semantic_seg.py", [*common, "--size", "64", "--json", tmp_path / "s.json"],
                          world.parent, monkeypatch) == 0
    segmentation = json.loads((tmp_path / "s.json").read_text())
    assert undecodable(segmentation) == cut_in("test")
    assert segmentation["metrics"]["images"] == SPLIT_OF.count("test") - 1
    features = tmp_path / "images.npz"  # extraction's record: the skipped array of its output
    assert run_in_process("image_features_extraction.py", ["-p", model, "-d", world.parent, "-o", features, "--size",
                                                           "64", "--workers", "0", "--no-progress", "--device", "cpu"],
                          world.parent, monkeypatch) == 0
    with np.load(features) as saved:
        skipped = sorted(Path(str(path)).name for path, _ in saved["skipped"])
        assert skipped == sorted(cut_in("train") + cut_in("val") + cut_in("test"))
        assert len(saved["paths"]) == len(list(world.parent.glob("*.png")))  # every cut image was a .jpg
