"""The Flickr30K Entities reader on hand-written files in the dataset's formats, its writer, and the any-box hit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from misc.data import flickr_entities as fe
from misc.config import TrainConfig
from misc.errors import UserError
from misc.eval.localization import phrase_hit
from models.config import ModelConfig
from tests.conftest import random_checkpoint as tiny_checkpoint
from tests.conftest import run_in_process

SENTENCES = """\
[/EN#18/people A man] with [/EN#19/bodyparts pierced ears] is wearing [/EN#20/clothing glasses] .
[/EN#21/people/other Two people] stand in [/EN#22/scene a park] near [/EN#0/notvisual something] and [/EN#23/other it]
"""

ANNOTATION = """<annotation>
\t<filename>1000.jpg</filename>
\t<size><width>500</width><height>375</height><depth>3</depth></size>
\t<object><name>18</name><name>21</name>
\t\t<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>110</xmax><ymax>220</ymax></bndbox></object>
\t<object><name>21</name>
\t\t<bndbox><xmin>301</xmin><ymin>51</ymin><xmax>400</xmax><ymax>350</ymax></bndbox></object>
\t<object><name>20</name>
\t\t<bndbox><xmin>41</xmin><ymin>31</ymin><xmax>60</xmax><ymax>40</ymax></bndbox></object>
\t<object><name>19</name><nobndbox>1</nobndbox><scene>0</scene></object>
\t<object><name>22</name><nobndbox>0</nobndbox><scene>1</scene></object>
</annotation>
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for folder, name, text in (("Sentences", "1000.txt", SENTENCES), ("Annotations", "1000.xml", ANNOTATION)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(text)
    (tmp_path / "test.txt").write_text("1000\n")
    (tmp_path / "train.txt").write_text("")
    return tmp_path


def test_sentences_keep_phrases_chains_types_and_word_positions(root: Path) -> None:
    first, second = fe.read_sentences(root / "Sentences" / "1000.txt")
    assert first.text == "A man with pierced ears is wearing glasses ."
    assert [(p.text, p.entity, p.types, p.first_word) for p in first.phrases] == [
        ("A man", "18", ("people",), 0), ("pierced ears", "19", ("bodyparts",), 3), ("glasses", "20", ("clothing",), 7)]
    assert second.text.split()[4:6] == ["a", "park"]
    assert [(p.entity, p.types) for p in second.phrases] == [("21", ("people", "other")), ("22", ("scene",)),
                                                             ("0", ("notvisual",)), ("23", ("other",))]
    assert second.phrases[3].first_word == len(second.text.split()) - 1


def test_annotation_boxes_shared_boxes_and_flags(root: Path) -> None:
    annotation = fe.read_annotation(root / "Annotations" / "1000.xml")
    assert (annotation.width, annotation.height) == (500, 375)
    # 1-based inclusive pixels 11..110 are the continuous interval [10, 110): x 10, width 100
    assert annotation.boxes["18"] == [(10.0, 20.0, 100.0, 200.0)]
    assert annotation.boxes["21"] == [(10.0, 20.0, 100.0, 200.0), (300.0, 50.0, 100.0, 300.0)]  # shares 18's box
    assert annotation.scene == {"22"} and annotation.nobox == {"19"}
    found = {entity: fe.entity_boxes(annotation, entity) for entity in ("18", "19", "22", "0", "23")}
    assert found["18"] == ([(10.0, 20.0, 100.0, 200.0)], None)
    assert found["19"] == ([], "no box") and found["22"] == ([], "scene")
    assert found["0"] == ([], "not visual") and found["23"] == ([], "not annotated")
    assert fe.entity_boxes(annotation, "22", scene_as_image=True) == ([(0.0, 0.0, 500.0, 375.0)], None)


def test_writer_round_trip(tmp_path: Path) -> None:
    boxes = [(["3", "9"], (4.0, 5.0, 20.0, 30.0)), (["9"], (40.0, 0.0, 8.0, 8.0))]
    path = tmp_path / "7.xml"
    path.write_text(fe.annotation_xml("7.jpg", 64, 48, boxes, scene=["11"], nobox=["12"]))
    annotation = fe.read_annotation(path)
    assert annotation.boxes == {"3": [(4.0, 5.0, 20.0, 30.0)], "9": [(4.0, 5.0, 20.0, 30.0), (40.0, 0.0, 8.0, 8.0)]}
    assert (annotation.width, annotation.height, annotation.scene, annotation.nobox) == (64, 48, {"11"}, {"12"})
    line = f"{fe.format_phrase('3', ('other',), 'a red circle')} left of {fe.format_phrase('11', ('scene',), 'it')}"
    sentence = fe.parse_sentence(line)
    assert sentence.text == "a red circle left of it"
    assert [(p.entity, p.types, p.first_word) for p in sentence.phrases] == [("3", ("other",), 0),
                                                                              ("11", ("scene",), 5)]


def test_load_split_and_missing_files_name_the_key(root: Path) -> None:
    (image,) = fe.load_images(root, root / "images", "test")
    assert image.image_id == "1000" and image.path == root / "images" / "1000.jpg" and len(image.sentences) == 2
    assert fe.load_images(root, root / "images", "train") == []
    with pytest.raises(UserError, match="config key 'flickr_entities'.*val.txt not found"):
        fe.load_images(root, root / "images", "val")
    (root / "Annotations" / "1000.xml").write_text("<annotation><size><width>5</width></size>")
    with pytest.raises(UserError, match="1000.xml: not a Flickr30K Entities annotation file"):
        fe.load_images(root, root / "images", "test")


def test_a_phrase_hits_when_the_point_is_in_any_of_its_boxes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 20.0, 10.0]])
    assert phrase_hit(torch.tensor([55.0, 55.0]), boxes)  # the second box only
    assert phrase_hit(torch.tensor([5.0, 5.0]), boxes)
    assert not phrase_hit(torch.tensor([30.0, 30.0]), boxes)
    assert phrase_hit(torch.tensor([50.0, 50.0]), boxes) and not phrase_hit(torch.tensor([50.0, 50.0]), boxes,
                                                                                  strict=True)
    assert phrase_hit(torch.tensor([30.0, 30.0]), boxes, tolerance=28.5)  # 20 sqrt 2 from either box
    assert not phrase_hit(torch.tensor([30.0, 30.0]), boxes, tolerance=28.0)


def random_checkpoint(world: Path, path: Path, **model: object) -> Path:
    """A random-weight tiny model of either system (:func:`tests.conftest.random_checkpoint`), on the world's
    words, evaluating at the default test size."""
    torch.manual_seed(0)
    return tiny_checkpoint(path, ModelConfig(trunk="resnet18", word_dim=64, **model), world, TrainConfig().test_size)


def entities_pointing(path: Path, world: Path, out: Path, monkeypatch: pytest.MonkeyPatch, limit: int,
                      protocol: str) -> tuple[int, dict]:
    """pointing_game.py on the first ``limit`` images of the demo world's Flickr30K Entities test split at 64 px,
    per phrase: its exit status and its record."""
    status = run_in_process("pointing_game.py", ["-p", path, "--dataset", "demo_entities", "--size", "64", "--limit",
                                                 limit, "--protocol", protocol, "--json", out, "--per-phrase",
                                                 "--workers", "0", "--no-progress", "--device", "cpu"], world,
                            monkeypatch)
    return status, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.slow
@pytest.mark.parametrize("model", [{"maps_dim": 16, "embed_dim": 16, "sru_layers": 1},
                                   {"arch": "matchmap", "trunk_cut": "layer3", "region_dim": 16, "lstm_hidden": 16}])
def test_pointing_game_on_the_demo_worlds_entities(tiny_world, tmp_path, monkeypatch, model):
    path = random_checkpoint(tiny_world, tmp_path / "model.pth.tar", **model)
    status, report = entities_pointing(path, tiny_world, tmp_path / "pg.json", monkeypatch, 4, "centre")
    assert status == 0 and report["images_from"] == "Flickr30K Entities test" and report["metrics"]["images"] == 4
    metrics = report["metrics"]
    assert report["settings"]["k"] == (1 if "arch" not in model else None)  # round(0.075 d), d = 16; matchmap: unused
    assert set(report["skipped_reasons"]) <= {"scene"} and metrics["phrases"] + metrics["skipped"] == sum(
        len(s.phrases) for image in fe.load_images(tiny_world / "flickr30k_entities", tiny_world, "test", 4)
        for s in image.sentences)
    for row in report["per_phrase"]:
        cell = 64 / row["grid"][0]
        assert row["point"] == [cell * (row["peak_cell"][1] + 0.5), cell * (row["peak_cell"][0] + 0.5)]
        assert row["hit"] == any(x <= row["point"][0] <= x + w and y <= row["point"][1] <= y + h
                                 for x, y, w, h in row["boxes"])
    assert report["settings"]["grid"] == ([2, 2] if "arch" not in model else [4, 4])  # strides 32 and 16 (layer3)
    assert report["metrics"]["per_type"]["other"]["phrases"] == report["metrics"]["phrases"]
    assert report["metrics"]["accuracy"] == pytest.approx(
        100 * sum(r["hit"] for r in report["per_phrase"]) / report["metrics"]["phrases"])
