"""Several datasets in one run (issue 26, Das et al.'s "mix" checkpoints): train.dataset a name or a list, the
training sets concatenated with each one's counts in the log and the checkpoint, validation on the first one's
val split, one line for an unknown name among several, and --resume refusing a changed list."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from misc import config, presets
from misc.config import TrainConfig
from misc.data.mix import training_records
from misc.errors import UserError
from misc.store.export import card
from misc.train import distributed
from misc.train.run import RunOptions, load_data
from misc.train.state import Resume, check_resume
from models.config import ModelConfig
from tests.conftest import TINY_MODEL, run_in_process

# (split, captions) of each line of the JSON-lines world
LINES = [("train", ["a red square", "a square in red"]), ("train", ["a green disc"]), ("test", ["a white disc"]),
         ("train", ["a blue square", "blue", "a box"]), ("val", ["a red disc"])]


@pytest.fixture(scope="module")
def lines_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lines")
    for index in range(len(LINES)):
        Image.new("RGB", (48, 40), (40 * index, 90, 200)).save(folder / f"{index}.png")
    path = folder / "mine.jsonl"
    path.write_text("".join(json.dumps({"image": f"{index}.png", "split": split, "captions": captions}) + "\n"
                            for index, (split, captions) in enumerate(LINES)))
    return path


@pytest.fixture
def demo_paths(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo world's paths at the tiny world (as run_in_process sets them)."""
    for key, path in list(config.DEMO_PATHS.items()):
        monkeypatch.setitem(config.DEMO_PATHS, key, tiny_world / path.relative_to(config.DEMO_DIR))
    monkeypatch.setattr(config, "DEMO_DIR", tiny_world)
    return tiny_world


def train_images(lines_file: Path, world: Path) -> tuple[int, int]:
    """Images of the train split, counted from the files themselves: the demo world's Karpathy file and the
    JSON-lines file."""
    in_lines = sum(json.loads(line)["split"] == "train" for line in lines_file.read_text().splitlines())
    entries = json.loads((world / "dataset_coco.json").read_text())["images"]
    in_demo = sum(entry["split"] == "train" for entry in entries)
    return in_demo, in_lines


def test_a_dataset_is_stored_as_a_name_and_several_as_a_list():
    assert TrainConfig(dataset=["coco"]).dataset == "coco"  # one --dataset: stored as before lists
    assert asdict(TrainConfig(dataset=["coco"])) == asdict(TrainConfig(dataset="coco"))
    assert TrainConfig(dataset=["coco", "flickr30k"]).datasets == ["coco", "flickr30k"]
    assert TrainConfig(dataset="coco").datasets == ["coco"]
    _, train = config.apply_settings(*presets.preset("demo"), ['train.dataset=["demo", "mine.jsonl"]'])
    assert train.dataset == ["demo", "mine.jsonl"]
    for bad in ([], ["coco", "coco"]):
        with pytest.raises(UserError, match="train.dataset"):
            TrainConfig(dataset=bad)


def test_an_epoch_holds_the_items_of_both_datasets(lines_world, demo_paths, caplog):
    cfg = TrainConfig(dataset=["demo", str(lines_world)], split="train", val_split="val", batch_size=8, workers=0,
                      crop_size=32)
    with caplog.at_level(logging.INFO, logger="train"):
        data = load_data(ModelConfig(word_dim=64), cfg, RunOptions(out=Path("unused")),
                         distributed.Context(0, 1, torch.device("cpu")))
    in_demo, in_lines = train_images(lines_world, demo_paths)
    assert (in_demo, in_lines) == (48, 3)  # the fixtures' own sizes: the counts above read them right
    assert len(data.dataset) == (in_demo + in_lines) * cfg.captions_per_image
    assert [(count.images, count.pairs) for count in data.counts] == [(in_demo, in_demo * 5), (in_lines, in_lines * 5)]
    assert (f"training data: demo train: {in_demo} images, {in_demo * 5} pairs; {lines_world} train: {in_lines} "
            f"images, {in_lines * 5} pairs") in caplog.text
    # validation on the first dataset's val split: the demo world's 12 images, not the JSON-lines file's
    assert len(data.val_records) == 12 and all(record.image.suffix == ".jpg" for record in data.val_records)
    # each image keeps its own index across datasets: a caption's positives are its own image's
    _, _, ids, _ = data.dataset[len(data.dataset) - 1]
    assert data.train_records[ids].image == lines_world.parent / "3.png"


def test_an_image_in_two_datasets_is_said(lines_world, tmp_path, caplog):
    copy = tmp_path / "copy.jsonl"  # the first file's 1.png, by its absolute path
    image = lines_world.parent / "1.png"
    copy.write_text(json.dumps({"image": str(image), "split": "train", "captions": ["a disc in green"]}) + "\n")
    with caplog.at_level(logging.WARNING, logger="train"):
        records, counts, _ = training_records(TrainConfig(dataset=[str(lines_world), str(copy)], split="train"))
    assert [record.image.name for record in records] == ["0.png", "1.png", "3.png", "1.png"]
    assert [count.images for count in counts] == [3, 1]
    assert f"{copy} train: 1 of its images are also in an earlier dataset of the run, e.g. {image}" in caplog.text


def test_an_unknown_dataset_among_several_is_one_line(tiny_world, tmp_path, monkeypatch, capsys):
    args = ["--preset", "demo", "--dataset", "demo", "--dataset", "cocoa", "--out", tmp_path / "run", *TINY_MODEL]
    assert run_in_process("train.py", args, tiny_world, monkeypatch) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown dataset 'cocoa'" in error[0] and "did you mean coco" in error[0]
    assert error[0].startswith("error: train.dataset demo, cocoa:")


def saved_mix(datasets: list[str]) -> Resume:
    model, train = presets.preset("demo")
    model, train = replace(model, trunk_init="scratch"), replace(train, dataset=datasets)
    return Resume(Path("runs/x/last.pth.tar"), {"config": {"model": asdict(model), "train": asdict(train)}})


def test_resume_refuses_a_changed_list_of_datasets():
    model, train = presets.preset("demo")
    resume = saved_mix(["demo", "mine.jsonl"])
    assert check_resume(resume, model, replace(train, dataset=["demo", "mine.jsonl"]), allow=False).changes == ()
    for changed in (["demo"], ["mine.jsonl", "demo"], ["demo", "mine.jsonl", "coco"]):
        with pytest.raises(UserError) as refused:
            check_resume(resume, model, replace(train, dataset=changed), allow=False)
        assert f"train.dataset: ['demo', 'mine.jsonl'] -> {replace(train, dataset=changed).dataset!r}" in str(
            refused.value)
    # a run of one dataset saved before lists compares equal to the same dataset given as a list of one
    assert check_resume(saved_mix(["demo"]), model, replace(train, dataset=["demo"]), allow=False).changes == ()


def test_the_model_card_names_each_dataset_and_where_it_validated():
    train = asdict(TrainConfig(dataset=["coco", "mine.jsonl"], split="train"))
    text = card({"config": {"model": asdict(ModelConfig()), "train": train, "word_vectors": "w.txt"},
                 "source": "runs/mix/best.pth.tar", "epoch": 3}, None)
    assert ("- MS-COCO 2014 images with their captions, Karpathy's splits\n- `mine.jsonl` (a JSON-lines file, "
            "data/README.md)\n- trained on split `train`, validated on `val` of `coco`;") in text


@pytest.mark.slow
def test_a_run_over_two_datasets_logs_and_records_each_and_resumes_only_with_them(lines_world, tiny_world, tmp_path,
                                                                                  monkeypatch, caplog, capsys):
    out = tmp_path / "run"
    args = ["--preset", "demo", "--dataset", "demo", "--dataset", lines_world, "--split", "train", "--epochs", "1",
            "--limit", "8", "--out", out, *TINY_MODEL]
    with caplog.at_level(logging.INFO, logger="train"):
        assert run_in_process("train.py", args, tiny_world, monkeypatch) == 0
    in_lines = train_images(lines_world, tiny_world)[1]
    pairs = (8 + in_lines) * 5
    assert f"training data: demo train: 8 images, 40 pairs; {lines_world} train: {in_lines} images" in caplog.text
    assert f"on {8 + in_lines} demo+{lines_world} images ({pairs} pairs/epoch), validating on 12 of demo" in caplog.text
    saved = torch.load(out / "last.pth.tar", weights_only=True)
    assert saved["config"]["train"]["dataset"] == ["demo", str(lines_world)]
    assert saved["data"] == [{"dataset": "demo", "split": "train", "images": 8, "pairs": 40},
                             {"dataset": str(lines_world), "split": "train", "images": in_lines,
                              "pairs": in_lines * 5}]
    capsys.readouterr()
    assert run_in_process("train.py", ["--resume", out / "last.pth.tar", "--dataset", "demo", *TINY_MODEL],
                          tiny_world, monkeypatch) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"train.dataset: ['demo', '{lines_world}'] -> 'demo'" in error[0]
