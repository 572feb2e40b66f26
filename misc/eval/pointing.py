"""The pointing game (paper §4.3) as a loop over images: which phrases to ask about (Visual Genome regions of COCO
images, Flickr30K Entities phrases, or the regions of a JSON-lines file), why others are skipped, where each
phrase's heatmap peaks and whether that point hits one of its boxes (rows yielded as they are made, scored as they
pass: memory holds counts, not rows), and one figure per image.

The rules themselves (where a peak cell points, what a hit is) are in misc/eval/localization.py, the accuracies in
misc/eval/tally.py; pointing_game.py parses the command line and prints the summary.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from misc import config
from misc.data import flickr_entities
from misc.data.datasets import SPLITS, coco_files, is_custom, prepare_dataset, read_regions, uses_demo
from misc.data.decoded import EvalImages, Undecodable
from misc.data.flickr_entities import EntitiesImage
from misc.data.images import decode_image, unreadable
from misc.data.jsonl import Entry, image_size, split_entries
from misc.errors import UserError, check_choice, did_you_mean
from misc.data.spans import whole_phrase, word_span_tokens
from misc.eval.localization import (DAS2019, cell_points, peak_cells, phrase_hit, pixel_points,
                                    pointing_hits, scale_boxes)
from misc.eval.tally import Tally
from misc.store.results import Spool
from misc.visualize import overlays, save_png
from models.heatmaps import apply_filters

if TYPE_CHECKING:
    from misc.inference import Inference

log = logging.getLogger(__name__)

PAPER = {"accuracy": 33.8, "center_baseline": 19.5}  # Table 3: DSVE, d = 2400, k = 180, Visual Genome phrases
DATASETS = ("coco", "demo", "flickr30k_entities", "demo_entities")  # the last two: Flickr30K Entities files


@dataclass
class Phrase:
    text: str
    boxes: list[tuple[float, float, float, float]]  # x, y, width, height in the item's frame
    info: dict[str, Any]  # what names the phrase in the per-phrase rows
    types: tuple[str, ...] = ()  # Flickr30K Entities types
    words: tuple[str, int, int] | None = None  # Flickr30K Entities: its caption, first word, number of words


@dataclass
class Item:
    """One image and its kept phrases."""

    image_id: int | str
    path: Path
    frame: tuple[float, float]  # width, height of the frame of the boxes
    phrases: list[Phrase] = field(default_factory=list)


# --------------------------------------------------------------------------- which phrases

def skip_reason(text: str, boxes: list[tuple[float, ...]], model: Inference, min_words: int) -> str | None:
    words = [token for token in model.words.tokens(text) if any(c.isalnum() for c in token)]
    if not words:
        return "no words"
    if len(words) < min_words:
        return "too short"
    if model.known_words(text) == 0:
        return "no word in vocabulary"
    if not any(box[2] > 0 and box[3] > 0 for box in boxes):
        return "empty box"
    return None


def keep(item: Item, phrase: Phrase, reason: str | None, model: Inference, min_words: int,
         skipped: list[dict]) -> None:
    """Add ``phrase`` to ``item``, or to ``skipped`` with the first reason that applies."""
    reason = reason or ("image missing" if not item.path.is_file() else
                        skip_reason(phrase.text, phrase.boxes, model, min_words))
    if reason:
        skipped.append({**phrase.info, "image_id": item.image_id, "phrase": phrase.text, "reason": reason})
    else:
        item.phrases.append(phrase)


def select_regions(vg: list[tuple[object, list]], files: dict[int, Path], model: Inference,
                   min_words: int) -> tuple[list[Item], list[dict]]:
    """The Visual Genome images and phrases to evaluate, and the skipped phrases with their reasons."""
    items, skipped = [], []
    for image, regions in vg:
        item = Item(int(image.coco_id), files[int(image.coco_id)], (float(image.width), float(image.height)))
        for region in regions:
            box = (float(region.x), float(region.y), float(region.width), float(region.height))
            info = {"region_id": int(region.id), "vg_image_id": int(image.id)}
            keep(item, Phrase(region.phrase or "", [box], info), None, model, min_words, skipped)
        if item.phrases:
            items.append(item)
    return items, skipped


def select_entities(images: list[EntitiesImage], model: Inference, min_words: int,
                    scene_as_image: bool) -> tuple[list[Item], list[dict]]:
    """Every bracketed phrase of the Flickr30K Entities images with the boxes of its chain, and the skipped ones."""
    items, skipped = [], []
    for image in images:
        item = Item(image.image_id, image.path, (float(image.annotation.width), float(image.annotation.height)))
        for number, sentence in enumerate(image.sentences):
            for phrase in sentence.phrases:
                boxes, reason = flickr_entities.entity_boxes(image.annotation, phrase.entity, scene_as_image)
                info = {"sentence": number, "first_word": phrase.first_word, "entity": phrase.entity,
                        "types": list(phrase.types)}
                words = (sentence.text, phrase.first_word, len(phrase.text.split()))
                keep(item, Phrase(phrase.text, boxes, info, phrase.types, words), reason, model, min_words, skipped)
        if item.phrases:
            items.append(item)
    return items, skipped


def select_custom(entries: list[Entry], model: Inference,
                  min_words: int) -> tuple[list[Item], list[dict], list[tuple[str, str]]]:
    """The regions of a JSON-lines file's images (boxes in the stored image's pixels), the skipped ones, and the
    images that do not decode as (path, reason): e.g. a JPEG cut short skips its phrases with the decoder's
    reason."""
    items, skipped, broken_images = [], [], []
    for entry in entries:
        item = Item(entry.line, entry.image, tuple(float(side) for side in image_size(entry.image)))
        broken = unreadable(entry.image) if entry.image.is_file() else None  # a missing file: keep says so
        if broken:
            broken_images.append((str(entry.image), broken))
        for number, (phrase, box) in enumerate(entry.regions):
            keep(item, Phrase(phrase, [box], {"region": number}), broken, model, min_words, skipped)
        if item.phrases:
            items.append(item)
    if broken_images:
        log.warning("%d images cannot be decoded, their phrases skipped, e.g. %s (%s)", len(broken_images),
                    *broken_images[0])
    return items, skipped, broken_images


def load_items(model: Inference, dataset: str | None, split: str | None, limit: int | None, min_words: int,
               scene_as_image: bool) -> tuple[list[Item], list[dict], dict[str, Any]]:
    """The images and phrases of ``dataset`` (default: the one the model was trained on, the first of several;
    Flickr30K Entities for flickr30k), the skipped phrases, and where they come from: dataset, split, images_from
    (in words) and unreadable (the images that do not decode, as (path, reason); only one's own images are decoded
    ahead, a named dataset's are checked for presence)."""
    trained_on = config.dataset_names(model.config["train"]["dataset"])[0]
    dataset = dataset or ("flickr30k_entities" if trained_on == "flickr30k" else trained_on)
    if is_custom(dataset):
        split = split or "test"
        entries = split_entries(Path(dataset), split)
        items, skipped, broken = select_custom(entries[:limit], model, min_words)
        return items, skipped, {"dataset": dataset, "split": split, "unreadable": broken,
                                "images_from": f"{Path(dataset).name} split {split}"}
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset}: unknown{did_you_mean(dataset, DATASETS)}; choose one of "
                        f"{', '.join(DATASETS)} or a JSON-lines file with regions (data/README.md)")
    demo = uses_demo({"flickr30k_entities": "coco", "demo_entities": "demo"}.get(dataset, dataset))
    prepare_dataset(dataset)
    if dataset in ("flickr30k_entities", "demo_entities"):
        split = split or "test"
        if split not in flickr_entities.SPLITS:
            raise UserError(f"--split {split}: Flickr30K Entities has {', '.join(flickr_entities.SPLITS)}")
        root = config.path("flickr_entities", demo=demo)
        images = flickr_entities.load_images(root, config.path("flickr_images", demo=demo), split, limit)
        items, skipped = select_entities(images, model, min_words, scene_as_image)
        return items, skipped, {"dataset": dataset, "split": split, "unreadable": [],
                                "images_from": f"Flickr30K Entities {split}"}
    if split is not None:
        check_choice("--split", split, SPLITS)
    vg_dir = config.path("vg_dir", demo=demo)
    files = coco_files(config.path("coco_karpathy", demo=demo), config.path("coco_images", demo=demo), split)
    items, skipped = select_regions(read_regions(vg_dir, files, limit), files, model, min_words)
    return items, skipped, {"dataset": dataset, "split": split, "unreadable": [],
                            "images_from": f"Karpathy split {split}" if split else "COCO val2014"}


def skip_counts(skipped: list[dict]) -> dict[str, int]:
    """Skipped phrases per reason, the most frequent first."""
    return dict(Counter(s["reason"] for s in skipped).most_common())


# --------------------------------------------------------------------------- pointing and scoring

def phrase_filters(model: Inference, phrases: list[Phrase], k: int | None, context: str) -> torch.Tensor:
    """One filter per phrase (M, C): the phrase alone (``phrase``), or read in its caption (``caption``, the
    matchmap's in-context words, :meth:`Inference.filters_in_context`), each caption encoded once."""
    if context == "phrase":  # under model.text_units: phrases, a phrase read alone is one step
        return model.filters([whole_phrase(p.text) for p in phrases], k)
    captions: dict[str, int] = {}
    spans = []
    for p in phrases:
        if p.words is None:
            raise UserError("--context caption needs Flickr30K Entities phrases (a caption to read them in); "
                            "use --context phrase")
        caption, first, length = p.words
        try:
            span = word_span_tokens(caption, model.words.tokens(caption), first, length)
        except ValueError as error:
            raise UserError(f"phrase {p.text!r}: {error}") from None
        spans.append((captions.setdefault(caption, len(captions)), *span))
    return model.filters_in_context(list(captions), spans)


def point(model: Inference, items: list[Item], size: int, k: int | None, protocol: str, tolerance: float,
          batch_size: int, workers: int, progress: bool, context: str = "phrase",
          swap_xy: bool = False, undecodable: Undecodable | None = None) -> Iterator[dict]:
    """Peak of every phrase's heatmap, the point the protocol makes of it in the size x size frame, and whether
    it and the centre baseline hit one of the phrase's boxes; under ``das2019`` also each box's own hit
    (``box_hits``, ``center_box_hits``) at the arg-max pixel of the resized map (``pixel``). One row per phrase,
    in the items' phrase order, yielded batch by batch: a caller keeps what it needs (:class:`Tally`, a file).
    An image that does not decode gives no row and is added to ``undecodable`` (:func:`left_out` says which)."""
    images = EvalImages([item.path for item in items], model.transform(size), batch_size, workers,
                        model.device.type == "cuda", progress, undecodable)
    for batch in images:
        yield from batch_rows(model, [items[i] for i in batch.indices], batch.images, size, k, protocol, tolerance,
                              context, swap_xy)
    images.finish("their phrases are skipped with the decoder's reason")


def left_out(items: list[Item], undecodable: Undecodable) -> tuple[list[Item], list[dict]]:
    """After :func:`point`: the items whose image decoded, and the phrases of the others as skipped ones (their
    reason the decoder's, as :func:`select_custom` skips one's own undecodable images)."""
    skipped = [{**p.info, "image_id": item.image_id, "phrase": p.text, "reason": undecodable.found[str(item.path)]}
               for item in items if item.path in undecodable for p in item.phrases]
    return undecodable.kept(items, lambda item: item.path), skipped


@torch.no_grad()
def batch_rows(model: Inference, batch: list[Item], images: torch.Tensor, size: int, k: int | None, protocol: str,
               tolerance: float, context: str, swap_xy: bool) -> list[dict]:
    """The rows of :func:`point` for one batch of items and their images (B, 3, size, size)."""
    strict = protocol == "original"
    scored = []
    maps = model.maps(images)  # (B, C, h, w)
    grid = tuple(maps.shape[-2:])
    filters = phrase_filters(model, [p for item in batch for p in item.phrases], k, context)  # (M, C)
    padded = filters.new_zeros(len(batch), max(len(item.phrases) for item in batch), filters.shape[1])
    row = 0
    for b, item in enumerate(batch):
        padded[b, :len(item.phrases)] = filters[row:row + len(item.phrases)]
        row += len(item.phrases)
    heat = apply_filters(maps, padded)  # (B, P, h, w)
    cells = peak_cells(heat, column_major=strict).cpu()  # (B, P, 2)
    if protocol == DAS2019:
        middle = torch.tensor([size // 2, size // 2])
        centre = middle.double() + 0.5
    else:
        points = cell_points(cells, grid, size, size, protocol)
        centre = cell_points(torch.tensor([grid[0] // 2, grid[1] // 2]), grid, size, size, protocol)
    for b, item in enumerate(batch):
        if protocol == DAS2019:  # one image's maps at a time: P x size x size floats
            pixels, points_b = pixel_points(heat[b, :len(item.phrases)].cpu(), size, swap_xy)
        else:
            pixels, points_b = None, points[b]
        for p_index, (p, cell, xy) in enumerate(zip(item.phrases, cells[b], points_b)):
            boxes = scale_boxes(torch.tensor(p.boxes), item.frame, (size, size))
            record = {**p.info, "image_id": item.image_id, "phrase": p.text, "grid": list(grid),
                      "peak_cell": cell.tolist(), "point": xy.tolist(),
                      **({"box": boxes[0].tolist()} if len(boxes) == 1 else {}), "boxes": boxes.tolist(),
                      "hit": phrase_hit(xy, boxes, tolerance, strict),
                      "center_hit": phrase_hit(centre, boxes, tolerance, strict)}
            if pixels is not None:
                record.update(pixel=pixels[p_index].tolist(), center_pixel=middle.tolist(),
                              box_hits=box_hits(xy, boxes, tolerance),
                              center_box_hits=box_hits(centre, boxes, tolerance))
            scored.append(record)
    return scored


def play(rows: Iterable[dict], protocol: str, spool: Spool | None = None, keep: int = 1) -> tuple[Tally, list[dict]]:
    """Score ``rows`` as they come (:class:`Tally`), handing each to ``spool`` (the --json file's rows) and
    keeping only the first ``keep`` (the overlays' images, and the grid): memory holds counts, not rows."""
    tally, kept = Tally(protocol), []
    for row in rows:
        tally.add(row)
        if spool is not None:
            spool.add(row)
        if len(kept) < keep:
            kept.append(row)
    return tally, kept


def box_hits(point: torch.Tensor, boxes: torch.Tensor, tolerance: float) -> list[bool]:
    """Whether a point (2,) hits each box (N, 4) on its own (edges included): Das et al.'s trials."""
    return pointing_hits(point.reshape(1, 2).expand(len(boxes), 2), boxes, tolerance).tolist()


def hit_rule(protocol: str, tolerance: float) -> str:
    """What a hit is under ``protocol`` (and ``tolerance`` px), in words."""
    rule = {"original": "cell's top-left corner strictly inside the box",
            "centre": "cell's centre inside the box",
            DAS2019: "arg-max pixel of the bilinearly resized map inside each box, per caption, mean over "
                     "captions"}[protocol]
    return rule + (f", or within {tolerance:g} px of it (TorchRay convention)" if tolerance else "")


def write_overlays(model: Inference, items: list[Item], per_phrase: list[dict], size: int, k: int | None,
                   protocol: str, folder: Path, context: str = "phrase") -> list[Path]:
    """One figure per image (misc.visualize): each phrase's heatmap over the image with its ground-truth boxes and
    the point the protocol made of its peak (both read from the phrase's row, so the figure shows what was
    scored), the title saying whether that point hit one of the boxes."""
    written, rows = [], iter(per_phrase)
    for item in items:
        image = decode_image(item.path, exif=False)
        maps = model.maps(model.transform(size)(image)[None])
        heat = apply_filters(maps, phrase_filters(model, item.phrases, k, context))[0].cpu()  # (P, h, w)
        scored = [next(rows) for _ in item.phrases]  # rows are in the items' phrase order
        frame = (float(size), float(size))  # the frame of each row's boxes and point
        points = torch.tensor([row["point"] for row in scored]) * torch.tensor(image.size) / size  # (P, 2) x, y
        boxes = [scale_boxes(torch.tensor(row["boxes"]), frame, image.size).tolist() for row in scored]
        titles = [f"{p.text} ({'hit' if row['hit'] else 'miss'}, {protocol} rule)"
                  for p, row in zip(item.phrases, scored)]
        path = folder / f"pointing_{item.image_id}.png"
        save_png(overlays(image, heat, points, titles, boxes), path)
        written.append(path)
    return written
