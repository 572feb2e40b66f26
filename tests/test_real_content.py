"""The real-photo world of misc/data/photos.py (written by photo_world.py): honest scenes in the custom JSON-lines
format, and (slow) a short run from the ImageNet Lite0 trunk that learns it: retrieval R@10 at least 10x chance both
ways, the pointing game at 256 px at least 1.4x the centre baseline (issue 14)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import eval_retrieval
import photo_world
import pointing_game
import train
from misc import cli
from misc.data import photos
from misc.data.jsonl import read_entries, split_entries
from misc.data.datasets import load_records
from misc.errors import UserError
from misc.data.images import read_image

COUNTS = {"train": 6, "val": 2, "test": 4}
CLI_FLAGS = ["--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photos.generate(tmp_path_factory.mktemp("photos") / "world", seed=5, counts=COUNTS, size=96)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_boxes_and_masks_lie_inside_the_image_and_captions_name_what_is_there(world: Path) -> None:
    categories = {thing.category: thing for thing in photos.THINGS}
    grounds = {ground.category: ground for ground in photos.GROUNDS}
    for line in lines(world):
        assert read_image(world.parent / line["image"]).size == (96, 96)
        *objects, ground = line["segments"]
        masks = [mask_utils.decode({"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()}).astype(bool)
                 for s in line["segments"]]
        assert len(objects) == len(line["regions"]) in (1, 2) and ground["category"] in grounds
        assert not (np.logical_or.reduce(masks[:-1]) & masks[-1]).any()  # the background is what objects leave
        for segment, mask, region in zip(objects, masks, line["regions"]):
            x, y, w, h = region["box"]
            assert min(x, y) >= 0 and x + w <= 96 and y + h <= 96 and mask.any()
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)  # the mask fills its box
            assert region["phrase"] in categories[segment["category"]].phrases
        named = [{thing for thing in photos.THINGS if any(p in caption for p in thing.phrases)}
                 for caption in line["captions"]]
        there = {categories[s["category"]] for s in objects}
        assert len(line["captions"]) == 5 and all(found == there for found in named), line["captions"]
        others = set(grounds.values()) - {grounds[ground["category"]]}
        assert not any(place in caption for caption in line["captions"] for g in others for place in g.places)


def test_the_world_is_deterministic_per_seed_and_read_by_the_custom_loader(world: Path, tmp_path: Path) -> None:
    again = photos.generate(tmp_path / "again", seed=5, counts=COUNTS, size=96)
    other = photos.generate(tmp_path / "other", seed=6, counts=COUNTS, size=96)
    assert again.read_text() == world.read_text() != other.read_text()
    image = "images/test/00003.jpg"
    assert (again.parent / image).read_bytes() == (world.parent / image).read_bytes()
    assert [entry.split for entry in read_entries(world)] == [s for s, n in COUNTS.items() for _ in range(n)]
    assert len(load_records(str(world), "test")) == len(split_entries(world, "test")) == COUNTS["test"]


def test_an_occupied_folder_is_refused_unless_it_holds_the_same_world(world: Path, tmp_path: Path) -> None:
    before = world.stat().st_mtime_ns
    assert photos.generate(world.parent, seed=5, counts=COUNTS, size=96) == world
    assert world.stat().st_mtime_ns == before  # kept, not rewritten
    with pytest.raises(UserError, match="is not empty and holds no photo world of seed 7") as error:
        photos.generate(world.parent, seed=7, counts=COUNTS, size=96)
    assert "\n" not in str(error.value)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="choose an empty folder"):
        photos.generate(tmp_path / "mine", counts=COUNTS, size=96)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_photo_world_cli_writes_the_library_world_and_refuses_in_one_line(world: Path, tmp_path: Path, capsys) -> None:
    flags = ["--seed", "5", "--size", "96", *(f"--{split}={count}" for split, count in COUNTS.items())]
    photo_world.main([str(tmp_path / "cli"), *flags])
    written = tmp_path / "cli" / "photos.jsonl"
    assert capsys.readouterr().out.strip() == f"{written}: 12 images (6 train, 2 val, 4 test)"
    assert written.read_text() == world.read_text()
    image = "images/train/00005.jpg"
    assert (written.parent / image).read_bytes() == (world.parent / image).read_bytes()
    with pytest.raises(SystemExit) as exit_:
        cli.run(photo_world.main, [str(written.parent), *flags, "--seed", "7"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(error) == 1 and "holds no photo world of seed 7" in error[0]


def chance_at_10(candidates: int, relevant: int) -> float:
    """Percent chance that a random ranking of ``candidates`` puts one of ``relevant`` items in its first 10."""
    return 100 * (1 - math.comb(candidates - relevant, 10) / math.comb(candidates, 10))


@pytest.mark.slow
def test_a_short_run_from_the_imagenet_trunk_learns_real_photos(tmp_path: Path) -> None:
    """The ``photos`` preset from the offline Lite0 package and GloVe 6B 50-d, then both evaluators on the test
    split: R@10 at least 10x chance in both directions, pointing at 256 px at least 1.4x the centre baseline."""
    photo_world.main([str(tmp_path / "photos"), "--train", "1200", "--val", "50", "--test", "500"])  # as in README
    world = tmp_path / "photos" / "photos.jsonl"
    run = tmp_path / "run"
    train.main(["--preset", "photos", "--dataset", str(world), "--out", str(run), *CLI_FLAGS])
    checkpoint = ["-p", str(run / "last.pth.tar"), "--dataset", str(world), "--split", "test", *CLI_FLAGS]
    eval_retrieval.main([*checkpoint, "--json", str(tmp_path / "retrieval.json")])
    pointing_game.main([*checkpoint, "--size", "256", "--json", str(tmp_path / "pointing.json")])

    retrieval = json.loads((tmp_path / "retrieval.json").read_text())["metrics"]
    images, captions = retrieval["images"], retrieval["captions"]
    chance = {"caption_retrieval": chance_at_10(captions, captions // images), "image_retrieval": 1000 / images}
    for direction, at_chance in chance.items():
        assert retrieval["full"][direction]["R@10"] >= 10 * at_chance, (direction, retrieval["full"], at_chance)
    pointing = json.loads((tmp_path / "pointing.json").read_text())["metrics"]
    assert pointing["accuracy"] >= 1.4 * pointing["center_baseline"], pointing
