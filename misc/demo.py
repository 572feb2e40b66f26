"""The built-in synthetic "demo world": coloured shapes on textured backgrounds, written to disk in the real
COCO / Karpathy / Visual Genome / word2vec formats so that the real loaders, training and evaluation run on it.

Each image holds 1-3 non-overlapping objects (shape x colour x size) anywhere in the frame. Its five captions name
the objects with their attributes, where they are (position words from the object's box) and how they relate
(relations from the boxes of two objects), so every spatial word is true of the drawn geometry.

Layout under the world's root (val and test images come from val2014, as in Karpathy's COCO split):
    images/{train2014,val2014}/COCO_<folder>_<cocoid:012d>.jpg     RGB JPEG
    dataset_coco.json                                               Karpathy splits, 5 sentences per image
    annotations/{captions,instances}_{train2014,val2014}.json       COCO captions / instances (categories = SHAPES)
    vg/image_data.json, vg/region_descriptions.json                 Visual Genome regions of the val2014 images
    words/demo_word2vec.bin                                         word2vec (binary) trained on train captions only
    demo.json                                                       marker written last: version, seed, sizes, size
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from gensim.models import Word2Vec
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from misc import words

DEMO_SPLITS = {"train": 6000, "val": 500, "test": 1000}
VERSION = 2
WORD_DIM = 64
IMAGE_SIZE = 128

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]  # COCO category ids 1..6 in this order
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 50), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (150, 40, 190), "orange": (245, 140, 30)}
SIZES = {"small": (0.18, 0.24), "large": (0.34, 0.45)}  # side of the object's square cell / image side

SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"], "star": ["star"],
               "cross": ["cross", "plus sign"], "diamond": ["diamond", "rhombus"]}
COLOUR_WORDS = {"red": ["red"], "green": ["green"], "blue": ["blue"], "yellow": ["yellow"],
                "purple": ["purple", "violet"], "orange": ["orange"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
POSITION_PHRASES = {
    "centre": ["in the middle", "in the centre", "in the center"],
    "top": ["at the top", "near the top"], "bottom": ["at the bottom", "near the bottom"],
    "left": ["on the left", "on the left side"], "right": ["on the right", "on the right side"],
    "top left": ["in the top left corner", "in the upper left corner", "at the top left"],
    "top right": ["in the top right corner", "in the upper right corner", "at the top right"],
    "bottom left": ["in the bottom left corner", "in the lower left corner", "at the bottom left"],
    "bottom right": ["in the bottom right corner", "in the lower right corner", "at the bottom right"],
}
RELATION_PHRASES = {"left of": ["to the left of", "left of"], "right of": ["to the right of", "right of"],
                    "above": ["above", "over"], "below": ["below", "under", "beneath"]}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
GAP = 2  # pixels kept free between the cells of two objects



@dataclass(frozen=True)
class DemoObject:
    """One drawn object: its attributes and the square cell (x, y, side) in pixels that holds it."""
    shape: str
    colour: str
    size: str
    x: int
    y: int
    side: int

    @cached_property
    def polygon(self) -> list[tuple[float, float]]:
        """Outline in pixel coordinates; drawing, masks and COCO polygons all come from it."""
        return shape_polygon(self.shape, self.x, self.y, self.side)

    @cached_property
    def bbox(self) -> list[float]:
        """Tight box [x, y, w, h] of the outline, as in COCO."""
        xs, ys = zip(*self.polygon)
        return [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def shape_polygon(shape: str, x: float, y: float, side: float) -> list[tuple[float, float]]:
    """Vertices of `shape` inscribed in the square cell of corner (x, y) and width `side`."""
    r = side / 2
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "square":
        unit = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)])
    elif shape == "triangle":
        unit = np.array([(0, -1), (1, 1), (-1, 1)])
    elif shape == "diamond":
        unit = np.array([(0, -1), (1, 0), (0, 1), (-1, 0)])
    elif shape == "star":  # five points, the first pointing up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        unit = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "cross":  # plus sign, arms a third of the side wide
        t = 1 / 3
        unit = np.array([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
                         (-1, -t), (-t, -t)])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [tuple(p) for p in np.round(unit * r + (x + r, y + r), 2).tolist()]


def position_word(bbox: list[float], image_size: int) -> str:
    """Where a box [x, y, w, h] lies, from its centre in thirds of the image: 'top left', 'top', ..., 'centre'."""
    cx, cy = bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2
    vertical = "top" if cy < image_size / 3 else "bottom" if cy > 2 * image_size / 3 else ""
    horizontal = "left" if cx < image_size / 3 else "right" if cx > 2 * image_size / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def relation(a: list[float], b: list[float]) -> str:
    """How box a lies relative to disjoint box b: 'left of', 'right of', 'above' or 'below' (the widest gap)."""
    gaps = {"left of": b[0] - (a[0] + a[2]), "right of": a[0] - (b[0] + b[2]),
            "above": b[1] - (a[1] + a[3]), "below": a[1] - (b[1] + b[3])}
    word = max(gaps, key=gaps.__getitem__)
    if gaps[word] <= 0:
        raise ValueError(f"boxes {a} and {b} overlap")
    return word


def side_by_side(a: list[float], b: list[float]) -> bool:
    """True when the vertical extents of two boxes overlap, so that 'next to' is fair for a left/right pair."""
    return a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def sample_scene(rng: np.random.Generator, image_size: int) -> list[DemoObject]:
    """1-3 objects with uniform positions over the whole image; a cell touching an earlier one is re-drawn."""
    objects: list[DemoObject] = []
    for _ in range(int(rng.integers(1, 4))):
        shape, colour, size = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES)))
        side = int(round(rng.uniform(*SIZES[size]) * image_size))
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            if all(x >= o.x + o.side + GAP or o.x >= x + side + GAP or y >= o.y + o.side + GAP
                   or o.y >= y + side + GAP for o in objects):
                objects.append(DemoObject(shape, colour, size, x, y, side))
                break
    return objects


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _mention(rng: np.random.Generator, obj: DemoObject, image_size: int, where: bool) -> str:
    """'a big red circle', with its position phrase when `where`; the size word is left out now and then."""
    words = [_pick(rng, SIZE_WORDS[obj.size])] if rng.random() < 0.85 else []
    words += [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    text = _with_article(" ".join(words))
    return f"{text} {_pick(rng, POSITION_PHRASES[position_word(obj.bbox, image_size)])}" if where else text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(rng: np.random.Generator, style: str, objects: list[DemoObject], image_size: int) -> str:
    """One caption: 'list' and 'count' name every object with its position, 'relation' relates the first two
    (and places a third), 'short' names a single object."""
    order = [objects[i] for i in rng.permutation(len(objects))]
    n = len(order)
    if style == "list":
        text = _pick(rng, ["", "an image of ", "a picture of ", "a drawing of ", "there is "])
        text += _join([_mention(rng, o, image_size, True) for o in order])
        if rng.random() < 0.3:
            text += f" on a {_pick(rng, ['textured', 'mottled', 'noisy'])} background"
    elif style == "count":
        head = f"{COUNT_WORDS[n]} {_pick(rng, ['shape', 'object'])}{'s' if n > 1 else ''}"
        text = _pick(rng, ["", f"there {'are' if n > 1 else 'is'} "]) + head + ": "
        text += _join([_mention(rng, o, image_size, True) for o in order])
    elif style == "relation":
        a, b = order[0], order[1]
        word = relation(a.bbox, b.bbox)
        options = RELATION_PHRASES[word] + (["next to", "beside"] if word in ("left of", "right of")
                                            and side_by_side(a.bbox, b.bbox) else [])
        text = f"{_mention(rng, a, image_size, False)} {_pick(rng, options)} {_mention(rng, b, image_size, False)}"
        if n == 3:
            text += " and " + _mention(rng, order[2], image_size, True)
    else:
        text = _mention(rng, order[0], image_size, rng.random() < 0.5)
        if n > 1:
            text += _pick(rng, [" among other shapes", " with other shapes", ""])
    return text[0].upper() + text[1:] + ("." if rng.random() < 0.5 else "")


def describe(rng: np.random.Generator, objects: list[DemoObject], image_size: int) -> list[str]:
    """Five captions; four name every object, the last ('short') may name only one."""
    several = len(objects) > 1
    styles = ["list", "count", "relation" if several else "list",
              _pick(rng, ["list", "count", "relation"] if several else ["list", "count"]), "short"]
    return [_caption(rng, style, objects, image_size) for style in styles]


def region_phrase(rng: np.random.Generator, obj: DemoObject) -> str:
    """A Visual Genome style phrase for one object, e.g. 'the small red circle'."""
    size, colour, shape = (_pick(rng, words[key]) for words, key in
                           ((SIZE_WORDS, obj.size), (COLOUR_WORDS, obj.colour), (SHAPE_WORDS, obj.shape)))
    return _pick(rng, [_with_article(f"{size} {colour} {shape}"), f"the {size} {colour} {shape}",
                       f"{size} {colour} {shape}", f"{colour} {shape}"])


def render(rng: np.random.Generator, objects: list[DemoObject], image_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw the objects on a smooth muted random background with grain; returns the RGB image and one
    boolean mask per object (exactly the pixels painted with its colour)."""
    grid = int(rng.integers(3, 7))
    cells = rng.uniform(70, 180, size=3) + rng.normal(0, 30, size=(grid, grid, 3))
    grey = cells.mean(axis=2, keepdims=True)
    cells = np.clip(grey + 0.25 * (cells - grey), 0, 255).astype(np.uint8)  # desaturated: objects stand out
    pixels = np.array(Image.fromarray(cells).resize((image_size, image_size), Image.BICUBIC), dtype=np.float32)
    masks = []
    for obj in objects:
        # pycocotools' own rasterisation: the painted pixels are exactly what annToMask gives for the polygon
        rle = mask_utils.frPyObjects([_flat(obj.polygon)], image_size, image_size)
        mask = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        pixels[mask] = np.array(COLOURS[obj.colour]) + rng.uniform(-12, 12, size=3)
        masks.append(mask)
    pixels += 5 * rng.standard_normal((image_size, image_size, 1), dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8), masks


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens of :func:`misc.words.tokenize`, as the word vectors are trained on."""
    return [token.lower() for token in words.tokenize(text)]


def _stable_hash(text: str) -> int:
    """Python's str hash changes between runs; word2vec's initial vectors must not."""
    return zlib.crc32(text.encode())


def _flat(polygon: list[tuple[float, float]]) -> list[float]:
    return [v for point in polygon for v in point]


def _segmentation(obj: DemoObject, mask: np.ndarray, crowd: bool) -> dict | list:
    if crowd:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return [_flat(obj.polygon)]


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _write_world(out: Path, seed: int, sizes: dict[str, int], image_size: int) -> None:
    """Everything but the marker: images, Karpathy, COCO captions / instances, VG regions, word2vec."""
    scene_rng, pixel_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    splits = [split for split in DEMO_SPLITS for _ in range(sizes[split])]
    coco_ids = sorted(int(i) for i in scene_rng.choice(10 * len(splits), size=len(splits), replace=False) + 1)
    karpathy, vg_images, vg_regions, corpus = [], [], [], []  # corpus: tokenised training captions
    coco = {folder: {"images": [], "captions": [], "instances": []} for folder in ("train2014", "val2014")}
    sentid = ann_id = region_id = 0
    progress = tqdm(list(zip(splits, coco_ids)), desc="demo world", leave=False, disable=None)  # silent off a tty
    for imgid, (split, coco_id) in enumerate(progress):
        folder = "train2014" if split == "train" else "val2014"
        file_name = f"COCO_{folder}_{coco_id:012d}.jpg"
        objects = sample_scene(scene_rng, image_size)
        captions = describe(scene_rng, objects, image_size)
        pixels, masks = render(pixel_rng, objects, image_size)
        path = out / "images" / folder / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90, subsampling=0)  # 4:4:4 keeps small shapes' colours crisp

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

    model = Word2Vec(corpus, vector_size=WORD_DIM, window=5, min_count=1, sg=1, epochs=5, workers=1, seed=seed,
                     hashfxn=_stable_hash)
    model.wv.vectors[:] = whiten(model.wv.vectors)
    (out / "words").mkdir()
    model.wv.save_word2vec_format(str(out / "words" / "demo_word2vec.bin"), binary=True)


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
    if marker.exists() and json.loads(marker.read_text()).get("version") == VERSION:
        return root
    print(f"Generating the demo world (seed {seed}) in {root} ...")
    return generate(root, seed)
