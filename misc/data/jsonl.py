"""One's own data: a JSON-lines file, one image per line (documented in data/README.md)::

    {"image": "photos/1.jpg", "captions": ["a red ball on grass"], "split": "train",
     "regions": [{"phrase": "a red ball", "box": [x, y, w, h]}],
     "segments": [{"category": "ball", "polygon": [[x1, y1, x2, y2, ...]]},
                  {"category": "grass", "rle": {"size": [h, w], "counts": "..."}}]}

Image paths are relative to the file's folder (or absolute); boxes and masks are in the stored image's pixel frame.
``split`` is any name; a file where no line has one is a single split that every name selects. ``regions`` (the
pointing game's phrases) and ``segments`` (semantic segmentation's masks, COCO polygons or RLE) are optional; a
caption holds the region phrases found in it (:func:`with_regions`: one step each under ``model.text_units:
phrases``).
Every malformed line is a one-line :class:`UserError` naming ``file:line``.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from misc.data.spans import Caption, char_offsets, find_tokens
from misc.data.words import tokenize
from misc.errors import UserError, did_you_mean


@dataclass
class Entry:
    """One line of a custom file."""

    line: int
    image: Path
    captions: list[str]
    split: str | None
    regions: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)  # phrase, x y w h
    segments: list[tuple[str, list | dict]] = field(default_factory=list)  # category, COCO segmentation


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, Real) and not isinstance(v, bool) for v in value)


def _region(item: Any, where: str) -> tuple[str, tuple[float, float, float, float]]:
    if not isinstance(item, dict) or not isinstance(item.get("phrase"), str):
        raise UserError(f"{where}: a region is {{\"phrase\": text, \"box\": [x, y, w, h]}}, got {item!r:.80}")
    box = item.get("box")
    if not _numbers(box) or len(box) != 4:
        raise UserError(f"{where}: region {item['phrase']!r}: box must be 4 numbers [x, y, w, h], got {box!r:.80}")
    if box[2] <= 0 or box[3] <= 0:
        raise UserError(f"{where}: region {item['phrase']!r}: box {box} has a non-positive width or height")
    return item["phrase"], tuple(float(v) for v in box)


def _segment(item: Any, where: str) -> tuple[str, list | dict]:
    if not isinstance(item, dict) or not isinstance(item.get("category"), str) or not item["category"].strip():
        raise UserError(f"{where}: a segment is {{\"category\": name, \"polygon\": [[x1, y1, ...]]}} or "
                        f"{{\"category\": name, \"rle\": {{\"size\": [h, w], \"counts\": ...}}}}, got {item!r:.80}")
    name = item["category"]
    if ("polygon" in item) == ("rle" in item):
        raise UserError(f"{where}: segment {name!r}: give exactly one of \"polygon\" and \"rle\"")
    if "polygon" in item:
        polygons = item["polygon"]
        if (not isinstance(polygons, list) or not polygons
                or not all(_numbers(p) and len(p) >= 6 and len(p) % 2 == 0 for p in polygons)):
            raise UserError(f"{where}: segment {name!r}: polygon must be a list of [x1, y1, x2, y2, x3, y3, ...] "
                            f"lists (3 points or more), got {polygons!r:.80}")
        return name, [[float(v) for v in p] for p in polygons]
    rle = item["rle"]
    size = rle.get("size") if isinstance(rle, dict) else None
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if (not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)
            or not isinstance(counts, (str, list))):
        raise UserError(f"{where}: segment {name!r}: rle must be {{\"size\": [h, w], \"counts\": string or list "
                        f"of run lengths}}, got {rle!r:.80}")
    if isinstance(counts, list):
        if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != size[0] * size[1]:
            raise UserError(f"{where}: segment {name!r}: rle counts must be run lengths adding up to h * w = "
                            f"{size[0] * size[1]}")
    else:
        try:
            decoded = mask_utils.decode({"size": size, "counts": counts.encode("ascii")})
        except (ValueError, TypeError, UnicodeEncodeError) as error:
            raise UserError(f"{where}: segment {name!r}: rle counts do not decode ({error})") from error
        if decoded.shape != tuple(size):
            raise UserError(f"{where}: segment {name!r}: rle counts do not decode to size {size}")
    return name, {"size": list(size), "counts": counts}


def _entry(item: Any, number: int, path: Path) -> Entry:
    where = f"{path}:{number}"
    if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"]:
        raise UserError(f"{where}: missing \"image\" (a path relative to {path.parent} or absolute)")
    captions = item.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise UserError(f"{where}: \"captions\" must be a non-empty list of strings, got {captions!r:.80}")
    split = item.get("split")
    if split is not None and (not isinstance(split, str) or not split):
        raise UserError(f"{where}: \"split\" must be a name such as \"train\", got {split!r}")
    for key in ("regions", "segments"):
        if not isinstance(item.get(key, []), list):
            raise UserError(f"{where}: \"{key}\" must be a list")
    image = Path(item["image"])
    regions = [_region(r, where) for r in item.get("regions", [])]
    if regions:
        captions = [with_regions(caption, [phrase for phrase, _ in regions]) for caption in captions]
    return Entry(number, image if image.is_absolute() else path.parent / image, captions, split, regions,
                 [_segment(s, where) for s in item.get("segments", [])])


def with_regions(caption: str, phrases: list[str]) -> str:
    """``caption`` as a :class:`misc.data.spans.Caption` holding the characters of each region phrase found in it
    (the first run of the phrase's tokens, case-insensitive, that overlaps no phrase found before), so that
    ``model.text_units: phrases`` reads it as one step; ``caption`` itself when none is found."""
    tokens = tokenize(caption)
    try:
        starts = char_offsets(caption, tokens)
    except ValueError:  # a token the tokeniser rewrote: no characters to hold
        return caption
    spans: list[tuple[int, int]] = []
    for phrase in phrases:
        found = find_tokens(tokens, tokenize(phrase))
        if found is not None:
            low, high = starts[found[0]], starts[found[1] - 1] + len(tokens[found[1] - 1])
            if all(high <= start or end <= low for start, end in spans):
                spans.append((low, high))
    return Caption(caption, sorted(spans)) if spans else caption


def read_entries(path: Path) -> list[Entry]:
    """Every line of a custom file, checked; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read as a UTF-8 JSON-lines file ({error})") from error
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise UserError(f"{path}:{number}: not JSON ({error})") from error
        entries.append(_entry(item, number, path))
    if not entries:
        raise UserError(f"{path}: no line holds an image")
    split_less = [entry.line for entry in entries if entry.split is None]
    if split_less and len(split_less) < len(entries):
        raise UserError(f"{path}:{split_less[0]}: no \"split\" while other lines have one; give every line a split")
    return entries


def split_entries(path: Path, split: str) -> list[Entry]:
    """The entries of ``split`` (all of them when the file names no split); an unknown split is an error with the
    file's split names and the closest one."""
    entries = read_entries(path)
    if entries[0].split is None:
        return entries
    names = sorted({entry.split for entry in entries})
    if split not in names:
        raise UserError(f"{path}: no split {split!r}{did_you_mean(split, names)}; the file has {', '.join(names)}")
    return [entry for entry in entries if entry.split == split]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header, (0, 0) when it cannot be opened."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError:
        return 0, 0


def as_coco(entries: list[Entry], path: Path) -> COCO:
    """The entries' segments as an in-memory COCO instances index (image id = line number, category ids 1.. in
    name order), so that segmentation reads masks the way it does on COCO (pycocotools ``annToMask``)."""
    names = sorted({name for entry in entries for name, _ in entry.segments})
    category = {name: number for number, name in enumerate(names, start=1)}
    images, annotations = [], []
    for entry in entries:
        width, height = image_size(entry.image)
        images.append({"id": entry.line, "file_name": str(entry.image), "width": width, "height": height})
        for name, segmentation in entry.segments:
            if isinstance(segmentation, dict) and segmentation["size"] != [height, width]:
                raise UserError(f"{path}:{entry.line}: segment {name!r}: rle size {segmentation['size']} is not the "
                                f"image's [h, w] = [{height}, {width}]")
            annotations.append({"id": len(annotations) + 1, "image_id": entry.line, "category_id": category[name],
                                "segmentation": segmentation, "iscrowd": int(isinstance(segmentation, dict))})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": number, "name": name} for name, number in category.items()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco
