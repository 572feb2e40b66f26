"""A JPEG cut short in one's own data (issue 27): its header reads, its pixels do not. It is found before anything
runs (one log line), and a training epoch with its validation and every evaluator run on splits that hold one."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_an_epoch_with_validation_and_every_evaluator_run_past_them(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train = ["--preset", "demo", "--dataset", world, "--split", "train", "--val-split", "val", "--words",
             "glove-6b-50d", "--set", "model.word_dim=50", "--epochs", "1", *TINY_MODEL, "--batch-size", "4"]
    assert run_in_process("train.py", [*train, "--out", out], world.parent, monkeypatch) == 0
    model = out / "last.pth.tar"
    common = ["-p", model, "--dataset", world, "--split", "test", "--workers", "0", "--no-progress", "--device", "cpu"]
    assert run_in_process("eval_retrieval.py", [*common, "--protocols", "full", "--json", tmp_path / "r.json"],
                          world.parent, monkeypatch) == 0
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["images"] == SPLIT_OF.count("test") - 1
    assert run_in_process("pointing_game.py", [*common, "--size", "64", "--json", tmp_path / "p.json"],
                          world.parent, monkeypatch) == 0
    assert run_in_process("semantic_seg.py", [*common, "--size", "64", "--json", tmp_path / "s.json"],
                          world.parent, monkeypatch) == 0
