"""The built-in synthetic "demo world": coloured shapes on textured backgrounds, written to disk in the real
COCO / Karpathy / Visual Genome / word2vec formats so that the real loaders, training and evaluation run on it.

The scenes, their captions and pixels come from misc/data/scenes.py.

Layout under the world's root (val and test images come from val2014, as in Karpathy's COCO split):
    images/{train2014,val2014}/COCO_<folder>_<cocoid:012d>.jpg     RGB JPEG
    dataset_coco.json                                               Karpathy splits, 5 sentences per image
    annotations/{captions,instances}_{train2014,val2014}.json       COCO captions / instances (categories = SHAPES)
    vg/image_data.json, vg/region_descriptions.json                 Visual Genome regions of the val2014 images
    flickr30k_entities/{Sentences,Annotations}/<cocoid>.{txt,xml}   the same captions and boxes as Flickr30K Entities:
    flickr30k_entities/{train,val,test}.txt, images/<cocoid>.jpg    one chain per object, per group of objects
                                                                    ("two shapes") and for the background (scene);
                                                                    images are hard links to the COCO-named files
    words/demo_word2vec.bin                                         word2vec (binary) trained on train captions only
    demo.json                                                       marker written last: version, seed, sizes, size
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from gensim.models import Word2Vec
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from misc.data import words
from misc.data.flickr_entities import annotation_xml, format_phrase
from misc.data.scenes import (SHAPES, DemoObject, Mention, Segment, caption_text, describe_segments, flat_polygon,
                         region_phrase, render, sample_scene)

DEMO_SPLITS = {"train": 6000, "val": 500, "test": 1000}
VERSION = 2
WORD_DIM = 64
IMAGE_SIZE = 128


@functools.lru_cache(maxsize=2**16)
def _tokens(text: str) -> tuple[str, ...]:
    """:func:`misc.data.words.tokenize`, once per distinct text: the world's mentions and captions repeat a few thousand
    phrases (writing 800 images asks for 26291 tokenizations of 4770 distinct texts)."""
    return tuple(words.tokenize(text))


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens of :func:`misc.data.words.tokenize`, as the word vectors are trained on."""
    return [token.lower() for token in _tokens(text)]


def _stable_hash(text: str) -> int:
    """Python's str hash changes between runs; word2vec's initial vectors must not."""
    return zlib.crc32(text.encode())


def _segmentation(obj: DemoObject, mask: np.ndarray, crowd: bool) -> dict | list:
    if crowd:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return [flat_polygon(obj.polygon)]


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _write_world(out: Path, seed: int, sizes: dict[str, int], image_size: int) -> None:
    """Everything but the marker: images, Karpathy, COCO captions / instances, VG regions, word2vec."""
    scene_rng, pixel_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    splits = [split for split in DEMO_SPLITS for _ in range(sizes[split])]
    coco_ids = sorted(int(i) for i in scene_rng.choice(10 * len(splits), size=len(splits), replace=False) + 1)
    karpathy, vg_images, vg_regions, corpus = [], [], [], []  # corpus: tokenised training captions
    entity_splits: dict[str, list[int]] = {split: [] for split in DEMO_SPLITS}
    chains = itertools.count(1)  # Flickr30K Entities chain ids, unique over the world (0 is "notvisual")
    coco = {folder: {"images": [], "captions": [], "instances": []} for folder in ("train2014", "val2014")}
    sentid = ann_id = region_id = 0
    progress = tqdm(list(zip(splits, coco_ids)), desc="demo world", leave=False, disable=None)  # silent off a tty
    for imgid, (split, coco_id) in enumerate(progress):
        folder = "train2014" if split == "train" else "val2014"
        file_name = f"COCO_{folder}_{coco_id:012d}.jpg"
        objects = sample_scene(scene_rng, image_size)
        segmented = describe_segments(scene_rng, objects, image_size)
        captions = [caption_text(segments) for segments in segmented]
        pixels, masks = render(pixel_rng, objects, image_size)
        path = out / "images" / folder / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90, subsampling=0)  # 4:4:4 keeps small shapes' colours crisp

        _write_entities(out / "flickr30k_entities", coco_id, path, objects, segmented, image_size, chains)
        entity_splits[split].append(coco_id)

        tokens = [tokenize(c) for c in captions]
        if split == "train":
            corpus += tokens
        sentences = [{"raw": c, "tokens": [t for t in words if t.isalnum()], "imgid": imgid, "sentid": sentid + k}
                     for k, (c, words) in enumerate(zip(captions, tokens))]
        karpathy.append({"filepath": folder, "filename": file_name, "imgid": imgid, "split": split,
                         "cocoid": coco_id, "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        files = coco[folder]
        files["images"].append({"id": coco_id, "file_name": file_name, "width": image_size, "height": image_size})
        files["captions"] += [{"id": s["sentid"] + 1, "image_id": coco_id, "caption": s["raw"]} for s in sentences]
        sentid += len(sentences)
        for obj, mask in zip(objects, masks):
            ann_id += 1
            crowd = scene_rng.random() < 0.2  # some RLE masks so both COCO segmentation paths are used
            files["instances"].append({
                "id": ann_id, "image_id": coco_id, "category_id": SHAPES.index(obj.shape) + 1,
                "segmentation": _segmentation(obj, mask, crowd), "area": int(mask.sum()), "bbox": obj.bbox,
                "iscrowd": int(crowd)})
        if folder == "val2014":
            vg_id = 1_000_000 + len(vg_images)  # unlike the COCO id: users must go through coco_id
            vg_images.append({"image_id": vg_id, "url": f"demo://{file_name}", "width": image_size,
                              "height": image_size, "coco_id": coco_id, "flickr_id": None})
            regions = []
            for obj in objects:
                region_id += 1
                x, y, w, h = obj.bbox
                regions.append({"region_id": region_id, "image_id": vg_id, "phrase": region_phrase(scene_rng, obj),
                                "x": int(x), "y": int(y), "width": int(np.ceil(x + w)) - int(x),
                                "height": int(np.ceil(y + h)) - int(y)})
            vg_regions.append({"id": vg_id, "regions": regions})

    _write_json(out / "dataset_coco.json", {"dataset": "coco", "images": karpathy})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    info = {"description": "DSVE-Loc synthetic demo world", "version": str(VERSION), "year": 2018}
    for folder, files in coco.items():
        _write_json(out / "annotations" / f"captions_{folder}.json", {
            "info": info, "images": files["images"], "annotations": files["captions"], "licenses": []})
        _write_json(out / "annotations" / f"instances_{folder}.json", {
            "info": info, "images": files["images"], "annotations": files["instances"],
            "categories": categories, "licenses": []})
    _write_json(out / "vg" / "image_data.json", vg_images)
    _write_json(out / "vg" / "region_descriptions.json", vg_regions)
    for split, ids in entity_splits.items():
        (out / "flickr30k_entities" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))

    model = Word2Vec(corpus, vector_size=WORD_DIM, window=5, min_count=1, sg=1, epochs=5, workers=1, seed=seed,
                     hashfxn=_stable_hash)
    model.wv.vectors[:] = whiten(model.wv.vectors)
    (out / "words").mkdir()
    model.wv.save_word2vec_format(str(out / "words" / "demo_word2vec.bin"), binary=True)


def _write_entities(root: Path, image_id: int, image: Path, objects: list[DemoObject],
                    segmented: list[list[Segment]], image_size: int, chains: itertools.count) -> None:
    """One image in Flickr30K Entities format: its captions with their mentions bracketed (an object, a group of
    objects or the background, each a coreference chain), its boxes with the chains they serve, and its image
    file as a hard link (a copy where links are not possible)."""
    chain: dict[tuple[int, ...], str] = {(index,): str(next(chains)) for index in range(len(objects))}
    lines = []
    for segments in segmented:
        tokens = []
        for segment in segments:
            if isinstance(segment, Mention):
                key = tuple(sorted(segment.objects))
                if key not in chain:
                    chain[key] = str(next(chains))
                types = ("other",) if key else ("scene",)
                tokens.append(format_phrase(chain[key], types, " ".join(_tokens(segment.text))))
            else:
                tokens += _tokens(segment)
        lines.append(" ".join(tokens) + "\n")
    boxes = []
    for index, obj in enumerate(objects):
        x, y, w, h = obj.bbox
        served = [name for key, name in chain.items() if index in key]
        boxes.append((served, (int(x), int(y), int(np.ceil(x + w)) - int(x), int(np.ceil(y + h)) - int(y))))
    scene = [chain[()]] if () in chain else []
    for folder, name, text in (("Sentences", f"{image_id}.txt", "".join(lines)), ("Annotations", f"{image_id}.xml",
                               annotation_xml(f"{image_id}.jpg", image_size, image_size, boxes, scene, []))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(text, encoding="utf-8")
    (root / "images").mkdir(parents=True, exist_ok=True)
    try:
        os.link(image, root / "images" / f"{image_id}.jpg")
    except OSError:
        shutil.copyfile(image, root / "images" / f"{image_id}.jpg")


def whiten(vectors: np.ndarray) -> np.ndarray:
    """ZCA-whiten word vectors over the vocabulary: centred, then every principal direction scaled to unit
    variance (directions the vocabulary does not span stay at zero), in the original coordinates.

    In the demo captions every colour word (and every shape, every size word) appears in exactly the same
    contexts, so word2vec gives each group nearly one vector (pairwise cosine 0.92-0.96), and what tells "red"
    from "blue" is a small residue that a frozen-embedding text encoder barely sees; real corpora give such words
    distinct contexts. Whitening removes the shared directions and brings the residues to the same scale.
    """
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    spanned = singular > singular.max() * 1e-6
    scale = np.sqrt(len(vectors) - 1) / singular[spanned]
    return (((centred @ basis[spanned].T) * scale) @ basis[spanned]).astype(vectors.dtype)


def _manifest(seed: int, sizes: dict[str, int], image_size: int) -> dict:
    return {"version": VERSION, "seed": seed, "sizes": sizes, "image_size": image_size}


def generate(root: Path, seed: int = 0, sizes: dict[str, int] | None = None, image_size: int = IMAGE_SIZE) -> Path:
    """Write a fresh demo world to `root` and return it. It is built in a sibling temporary folder and renamed
    into place with its marker `demo.json` written last, so an interrupted run leaves no complete-looking world.
    An existing `root` is replaced only if it is empty or a previous demo world."""
    root = Path(root)
    sizes = dict(DEMO_SPLITS if sizes is None else sizes)
    if set(sizes) != set(DEMO_SPLITS) or sizes["train"] < 1 or min(sizes.values()) < 0:
        raise ValueError(f"sizes must give image counts for {sorted(DEMO_SPLITS)} with train >= 1, got {sizes}")
    if root.exists() and any(root.iterdir()) and not (root / "demo.json").exists():
        raise FileExistsError(f"{root} exists and is not a demo world; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        _write_world(work, seed, sizes, image_size)
        _write_json(work / "demo.json", _manifest(seed, sizes, image_size))
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return root


def ensure(root: Path, seed: int = 0) -> Path:
    """Return ``root``, first generating the default demo world there unless it holds a complete world of this
    version (any seed or size: a smaller world made for tests is kept)."""
    root = Path(root)
    marker = root / "demo.json"
    complete = (root / "flickr30k_entities" / "test.txt").exists()  # worlds made before it had them lack it
    if complete and marker.exists() and json.loads(marker.read_text()).get("version") == VERSION:
        return root
    print(f"Generating the demo world (seed {seed}) in {root} ...")
    return generate(root, seed)
