"""The demo world: real file formats that the real loaders read, masks that match the pixels, captions whose
spatial words are true of the drawn geometry, word vectors without test leakage, and safe generation."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from gensim.models import KeyedVectors
from nltk.tokenize import TreebankWordTokenizer
from PIL import Image
from pycocotools.coco import COCO
from visual_genome import local as vg_local

from misc import config
from misc.data import datasets, demo, flickr_entities, scenes, words
from misc.errors import UserError

SIZES = {"train": 40, "val": 10, "test": 10}
IMAGE_SIZE = 96


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.generate(tmp_path_factory.mktemp("demo") / "world", seed=0, sizes=SIZES, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def karpathy(world: Path) -> list[dict]:
    return json.loads((world / "dataset_coco.json").read_text())["images"]


def test_karpathy_splits_captions_and_images(world: Path, karpathy: list[dict]) -> None:
    assert {s: sum(i["split"] == s for i in karpathy) for s in SIZES} == SIZES
    assert sorted(i["imgid"] for i in karpathy) == list(range(len(karpathy)))
    sentids = [s["sentid"] for i in karpathy for s in i["sentences"]]
    assert len(sentids) == len(set(sentids)) == 5 * len(karpathy)
    for image in karpathy:
        assert image["filepath"] == ("train2014" if image["split"] == "train" else "val2014")
        assert image["filename"] == f"COCO_{image['filepath']}_{image['cocoid']:012d}.jpg"
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        for sentence in image["sentences"]:
            assert sentence["imgid"] == image["imgid"] and sentence["tokens"]
            assert all(t == t.lower() and t.isalnum() for t in sentence["tokens"])
        with Image.open(world / "images" / image["filepath"] / image["filename"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_coco_captions_load(world: Path, karpathy: list[dict]) -> None:
    for folder, splits in (("train2014", {"train"}), ("val2014", {"val", "test"})):
        coco = COCO(str(world / "annotations" / f"captions_{folder}.json"))
        ids = {i["cocoid"] for i in karpathy if i["split"] in splits}
        assert set(coco.getImgIds()) == ids
        assert all(len(coco.getAnnIds(imgIds=[i])) == 5 for i in ids)


def test_instance_masks_match_drawn_pixels(world: Path) -> None:
    crowd = set()
    for folder in ("train2014", "val2014"):
        coco = COCO(str(world / "annotations" / f"instances_{folder}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == scenes.SHAPES
        assert all(coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds())
        for ann in coco.loadAnns(coco.getAnnIds()):
            crowd.add(ann["iscrowd"])
            if ann["iscrowd"]:
                assert isinstance(ann["segmentation"]["counts"], str)
            image = coco.loadImgs(ann["image_id"])[0]
            pixels = np.asarray(Image.open(world / "images" / folder / image["file_name"]), dtype=float)
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"]
            inside = pixels[mask].mean(axis=0)
            assert min(np.linalg.norm(inside - c) for c in scenes.COLOURS.values()) < 40
            # within the box (other objects are farther away), the pixels of that colour are the mask
            x, y, w, h = ann["bbox"]
            x0, y0, x1, y1 = max(int(x) - 1, 0), max(int(y) - 1, 0), int(np.ceil(x + w)) + 1, int(np.ceil(y + h)) + 1
            coloured = np.linalg.norm(pixels[y0:y1, x0:x1] - inside, axis=2) < 60
            window = mask[y0:y1, x0:x1]
            assert window.sum() == mask.sum()
            assert (coloured & window).sum() / (coloured | window).sum() > 0.8
    assert crowd == {0, 1}


def test_visual_genome_files_load(world: Path, karpathy: list[dict]) -> None:
    images = vg_local.get_all_image_data(str(world / "vg"))
    regions = vg_local.get_all_region_descriptions(str(world / "vg"))
    eval_ids = {i["cocoid"] for i in karpathy if i["split"] != "train"}
    assert {im.coco_id for im in images} == eval_ids
    assert all(im.id not in eval_ids for im in images)
    instances = COCO(str(world / "annotations" / "instances_val2014.json"))
    for image_regions in regions:
        coco_id = image_regions[0].image.coco_id
        boxes = [a["bbox"] for a in instances.loadAnns(instances.getAnnIds(imgIds=[coco_id]))]
        assert len(image_regions) == len(boxes)
        for region in image_regions:
            assert region.x >= 0 and region.x + region.width <= IMAGE_SIZE
            assert region.y >= 0 and region.y + region.height <= IMAGE_SIZE
            assert any(abs(region.x - x) <= 1 and abs(region.width - w) <= 2 and abs(region.y - y) <= 1
                       for x, y, w, h in boxes)


def test_flickr30k_entities_files_load_and_match_the_coco_files(world: Path, karpathy: list[dict]) -> None:
    root = world / "flickr30k_entities"
    instances = {folder: COCO(str(world / "annotations" / f"instances_{folder}.json"))
                 for folder in ("train2014", "val2014")}
    kinds = set()
    for split in SIZES:
        entries = [i for i in karpathy if i["split"] == split]
        images = flickr_entities.load_images(root, root / "images", split)
        assert [image.image_id for image in images] == [str(i["cocoid"]) for i in entries]
        for image, entry in zip(images, entries):
            coco_file = world / "images" / entry["filepath"] / entry["filename"]
            assert image.path.read_bytes() == coco_file.read_bytes()
            assert [s.text.split() for s in image.sentences] == [words.tokenize(s["raw"]) for s in entry["sentences"]]
            coco = instances[entry["filepath"]]
            truth = sorted(tuple(a["bbox"]) for a in coco.loadAnns(coco.getAnnIds(imgIds=[entry["cocoid"]])))
            annotation = image.annotation
            assert (annotation.width, annotation.height) == (IMAGE_SIZE, IMAGE_SIZE)
            for sentence in image.sentences:
                for phrase in sentence.phrases:
                    boxes, reason = flickr_entities.entity_boxes(annotation, phrase.entity)
                    kinds.add((phrase.types, reason, len(boxes) > 1))
                    if reason:  # only the background lacks a box
                        assert reason == "scene" and phrase.types == ("scene",) and "background" in phrase.text
                    else:
                        assert boxes
                    for x, y, w, h in boxes:  # each box covers the pixels of one drawn object's box
                        assert any(x == int(bx) and x + w == np.ceil(bx + bw) and y == int(by)
                                   and y + h == np.ceil(by + bh) for bx, by, bw, bh in truth)
    # objects, groups of objects ("two shapes": several boxes) and the background (a scene chain, no box)
    assert {(("other",), None, False), (("other",), None, True), (("scene",), "scene", False)} <= kinds


def test_word_vectors_cover_every_caption_without_leakage(world: Path, karpathy: list[dict]) -> None:
    vectors = KeyedVectors.load_word2vec_format(str(world / "words" / "demo_word2vec.bin"), binary=True)
    assert vectors.vector_size == demo.WORD_DIM
    train = {t for i in karpathy if i["split"] == "train" for s in i["sentences"] for t in demo.tokenize(s["raw"])}
    assert set(vectors.index_to_key) == train
    for image in karpathy:
        for sentence in image["sentences"]:
            assert set(demo.tokenize(sentence["raw"])) | set(sentence["tokens"]) <= train
    phrases = [r.phrase for rs in vg_local.get_all_region_descriptions(str(world / "vg")) for r in rs]
    assert {t for p in phrases for t in demo.tokenize(p)} <= train


def test_tokenize_is_lowercased_treebank(karpathy: list[dict]) -> None:
    treebank = TreebankWordTokenizer()
    for raw in (s["raw"] for i in karpathy for s in i["sentences"]):
        assert demo.tokenize(raw) == treebank.tokenize(raw.lower())


def test_same_seed_same_files(tmp_path: Path) -> None:
    sizes = {"train": 8, "val": 2, "test": 2}
    a, b, c = (demo.generate(tmp_path / name, seed=seed, sizes=sizes) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    for name in ("dataset_coco.json", "annotations/instances_val2014.json", "vg/region_descriptions.json",
                 "words/demo_word2vec.bin", "demo.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "dataset_coco.json").read_bytes() != (c / "dataset_coco.json").read_bytes()


def test_interrupted_generation_leaves_no_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"train": 4, "val": 1, "test": 1}
    old = demo.generate(tmp_path / "world", seed=0, sizes=sizes)
    before = (old / "dataset_coco.json").read_bytes()
    calls = []

    def failing_render(*args: object) -> None:
        calls.append(1)
        if len(calls) % 3 == 0:  # the third image of each run
            raise KeyboardInterrupt
        return render(*args)

    render = scenes.render
    monkeypatch.setattr(demo, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        demo.generate(tmp_path / "fresh", seed=1, sizes=sizes)
    with pytest.raises(KeyboardInterrupt):
        demo.generate(tmp_path / "world", seed=1, sizes=sizes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no partial world, no temporary folder
    assert (old / "dataset_coco.json").read_bytes() == before


def test_ensure_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(demo, "DEMO_SPLITS", {"train": 4, "val": 1, "test": 1})
    root = tmp_path / "world"
    assert demo.ensure(root) == root and (root / "demo.json").exists()
    assert "Generating" in capsys.readouterr().out
    stamp = (root / "dataset_coco.json").stat().st_mtime_ns
    demo.ensure(root)
    assert capsys.readouterr().out == "" and (root / "dataset_coco.json").stat().st_mtime_ns == stamp
    demo.ensure(root, seed=1)  # any complete world of this version is kept (tests use small ones)
    assert json.loads((root / "demo.json").read_text())["seed"] == 0
    manifest = json.loads((root / "demo.json").read_text())
    (root / "demo.json").write_text(json.dumps({**manifest, "version": demo.VERSION - 1}))
    demo.ensure(root, seed=1)  # an older version is replaced
    assert json.loads((root / "demo.json").read_text())["seed"] == 1
    (root / "flickr30k_entities" / "test.txt").unlink()
    demo.ensure(root, seed=2)  # so is a world made before it had its Flickr30K Entities files
    assert json.loads((root / "demo.json").read_text())["seed"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        demo.ensure(tmp_path / "other")


def test_the_demo_world_is_written_by_prepare_dataset_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Choosing the demo world's paths (uses_demo) reads and writes nothing; prepare_dataset writes the world where
    config.DEMO_DIR points, on first use and for the demo's datasets only."""
    monkeypatch.setattr(demo, "DEMO_SPLITS", {"train": 4, "val": 1, "test": 1})
    root = tmp_path / "relocated"
    monkeypatch.setattr(config, "DEMO_DIR", root)
    assert datasets.uses_demo("demo") and not datasets.uses_demo("coco")
    with pytest.raises(UserError, match="localization runs on COCO images"):
        datasets.uses_demo("flickr30k")
    for other in ("coco", "flickr30k", "flickr30k_entities", str(tmp_path / "mine.jsonl")):
        datasets.prepare_dataset(other)
    assert not root.exists() and capsys.readouterr().out == ""
    datasets.prepare_dataset("demo_entities")
    assert "Generating" in capsys.readouterr().out
    assert json.loads((root / "demo.json").read_text())["sizes"] == {"train": 4, "val": 1, "test": 1}
    assert (root / "flickr30k_entities" / "test.txt").is_file()
    stamp = (root / "dataset_coco.json").stat().st_mtime_ns
    datasets.prepare_dataset("demo")  # already there: kept as it is
    assert capsys.readouterr().out == "" and (root / "dataset_coco.json").stat().st_mtime_ns == stamp


def test_position_words_and_relations_on_hand_made_boxes() -> None:
    assert scenes.position_word([0, 0, 20, 20], 96) == "top left"
    assert scenes.position_word([40, 2, 16, 16], 96) == "top"
    assert scenes.position_word([76, 40, 20, 20], 96) == "right"
    assert scenes.position_word([38, 38, 20, 20], 96) == "centre"
    assert scenes.position_word([0, 70, 20, 26], 96) == "bottom left"
    assert scenes.position_word([70, 70, 20, 20], 96) == "bottom right"
    assert scenes.relation([0, 0, 10, 10], [30, 5, 10, 10]) == "left of"
    assert scenes.relation([30, 5, 10, 10], [0, 0, 10, 10]) == "right of"
    assert scenes.relation([0, 0, 10, 10], [5, 40, 10, 10]) == "above"
    assert scenes.relation([5, 40, 10, 10], [0, 0, 10, 10]) == "below"
    assert scenes.side_by_side([0, 0, 10, 10], [30, 5, 10, 10])
    assert not scenes.side_by_side([0, 0, 10, 10], [30, 20, 5, 5])
    with pytest.raises(ValueError):
        scenes.relation([0, 0, 10, 10], [5, 5, 10, 10])


def test_scenes_fill_the_image_without_overlap() -> None:
    rng = np.random.default_rng(0)
    drawn = [scenes.sample_scene(rng, 128) for _ in range(1000)]
    assert {len(s) for s in drawn} == {1, 2, 3}
    assert {scenes.position_word(o.bbox, 128) for s in drawn for o in s} == set(scenes.POSITION_PHRASES)
    for scene in drawn:
        for i, a in enumerate(scene):
            assert a.x >= 0 and a.x + a.side <= 128 and a.y >= 0 and a.y + a.side <= 128
            assert scenes.SIZES[a.size][0] * 128 - 1 <= a.side <= scenes.SIZES[a.size][1] * 128 + 1
            for b in scene[i + 1:]:
                scenes.relation(a.bbox, b.bbox)  # raises if the boxes overlap


def _true_position(phrase: str, box: list[float], size: int) -> bool:
    """Independent of scenes.position_word: each word of the phrase must hold for the box centre."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    checks = {"left": cx < size / 3, "right": cx > 2 * size / 3, "top": cy < size / 3, "upper": cy < size / 3,
              "bottom": cy > 2 * size / 3, "lower": cy > 2 * size / 3,
              "middle": size / 3 <= min(cx, cy) and max(cx, cy) <= 2 * size / 3}
    checks["centre"] = checks["center"] = checks["middle"]
    return all(ok for word, ok in checks.items() if word in phrase.split())


def _true_relation(phrase: str, a: list[float], b: list[float]) -> bool:
    left, right = a[0] + a[2] < b[0], b[0] + b[2] < a[0]
    if phrase in ("next to", "beside"):
        return (left or right) and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
    if "left" in phrase:
        return left
    if "right" in phrase:
        return right
    return a[1] + a[3] < b[1] if phrase in ("above", "over") else b[1] + b[3] < a[1]


def test_caption_spatial_words_are_true() -> None:
    rng = np.random.default_rng(1)
    def words(table: dict) -> str:
        return "|".join(sorted({w for ws in table.values() for w in ws}, key=len, reverse=True))

    mention = re.compile(rf"\b(?:a|an) (?:({words(scenes.SIZE_WORDS)}) )?({words(scenes.COLOUR_WORDS)}) "
                         rf"({words(scenes.SHAPE_WORDS)})")
    positions = sorted({p for ps in scenes.POSITION_PHRASES.values() for p in ps}, key=len, reverse=True)
    relations = sorted({p for ps in scenes.RELATION_PHRASES.values() for p in ps} | {"next to", "beside"},
                       key=len, reverse=True)
    checked = 0
    for _ in range(300):
        scene = scenes.sample_scene(rng, 128)
        captions = scenes.describe(rng, scene, 128)
        assert len(captions) == 5
        complete = 0
        for caption in captions:
            text = caption.lower()
            count = re.match(r"(?:there (?:is|are) )?(one|two|three) (?:shape|object)", text)
            assert not count or count.group(1) == scenes.COUNT_WORDS[len(scene)]
            found = list(mention.finditer(text))
            named = []
            for m in found:
                size, colour, shape = m.groups()
                named.append([o for o in scene if colour in scenes.COLOUR_WORDS[o.colour]
                              and shape in scenes.SHAPE_WORDS[o.shape]
                              and (size is None or size in scenes.SIZE_WORDS[o.size])])
                assert named[-1], caption
            complete += len(found) == len(scene)
            for k, m in enumerate(found):
                if len(named[k]) > 1:
                    continue  # two objects answer this mention; nothing to check
                rest = text[m.end():].lstrip()
                position = next((p for p in positions if rest.startswith(p)), None)
                relation = next((p for p in relations if rest.startswith(p + " ")), None)
                if position:
                    assert _true_position(position, named[k][0].bbox, 128), caption
                    checked += 1
                elif relation and k + 1 < len(found) and len(named[k + 1]) == 1:
                    assert _true_relation(relation, named[k][0].bbox, named[k + 1][0].bbox), caption
                    checked += 1
        assert complete >= 4
    assert checked > 1000


def test_whiten_separates_words_that_share_every_context() -> None:
    # word2vec on a templated corpus: vectors near a low-rank structure, and six "colour words" with identical
    # contexts on almost one vector; what tells them apart is the small residue off the structure
    rng = np.random.default_rng(0)
    structure = rng.normal(size=(6, 16))
    colours = rng.normal(size=6) @ structure + 0.02 * rng.normal(size=(6, 16))
    others = rng.normal(size=(30, 6)) @ structure + 0.02 * rng.normal(size=(30, 16))
    vectors = np.concatenate([colours, others]).astype(np.float32)

    def colour_cosines(m: np.ndarray) -> np.ndarray:
        unit = m[:6] / np.linalg.norm(m[:6], axis=1, keepdims=True)
        return (unit @ unit.T)[~np.eye(6, dtype=bool)]

    assert colour_cosines(vectors).min() > 0.99
    white = demo.whiten(vectors)
    assert white.dtype == np.float32
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(16), atol=1e-3)
    assert np.abs(colour_cosines(white)).max() < 0.6
