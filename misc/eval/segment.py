"""Weakly supervised semantic segmentation (paper §4.3) as a loop over images: which images, each category's query,
every (image, category) score and IoU, and the per-category AP table.

The masks, IoU and the two AP rules are in misc/eval/segmentation.py; semantic_seg.py parses the command line and
prints the summary.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import inflect
import torch
from pycocotools.coco import COCO

from misc import config
from misc.data.datasets import (SPLITS, Record, is_custom, karpathy_records, load_coco, prepare_dataset, truth_masks,
                                uses_demo)
from misc.data.decoded import EvalImages, Undecodable
from misc.data.images import unreadable
from misc.data.jsonl import as_coco, split_entries
from misc.errors import UserError, check_choice
from misc.eval.localization import upsample
from misc.eval.segmentation import (ORIGINAL_SIDE, average_precision, binarize, iou, original_average_precision,
                                    original_iou, original_prediction, original_truth)
from models.heatmaps import apply_filters

if TYPE_CHECKING:
    from misc.inference import Inference

log = logging.getLogger(__name__)

PAPER = {"mAP@0.3": 34.0, "mAP@0.4": 24.0, "mAP@0.5": 15.0}  # percent
ALREADY_PLURAL = {"skis", "scissors"}  # COCO category names
IOU_THRESHOLDS = (0.3, 0.4, 0.5)
PROTOCOLS = ("original", "ranked")
THRESHOLD_RULES = {"original": f"heatmap (uint8, {ORIGINAL_SIDE}x{ORIGINAL_SIDE}) > threshold * (max - min)",
                   "ranked": "heatmap >= min + threshold * (max - min)"}


# --------------------------------------------------------------------------- queries

@functools.cache
def _inflect() -> inflect.engine:
    return inflect.engine()


def plural(noun: str) -> str:
    """English plural of a category name (inflect); COCO's names that already are plurals stay as they are."""
    return noun if noun in ALREADY_PLURAL else _inflect().plural_noun(noun)


def query(name: str, protocol: str = "ranked") -> str:
    """A category's query: ``ranked``, name and English plural ("cat cats"; the name once when both are the same);
    ``original``, the name and the name + "s" as the original wrote it ("bus buss")."""
    if protocol == "original":
        return f"{name} {name}s"
    many = plural(name)
    return name if many == name else f"{name} {many}"


def category_queries(coco: COCO, protocol: str, model: Inference) -> tuple[list[int], dict[int, str], dict[int, str]]:
    """The category ids (sorted), their names and their queries; warns of queries with no known word."""
    categories = sorted(coco.getCatIds())
    names = {c: coco.cats[c]["name"] for c in categories}
    queries = {c: query(names[c], protocol) for c in categories}
    unknown = [queries[c] for c in categories if model.known_words(queries[c]) == 0]
    if unknown:
        log.warning("no word of these queries is in the vocabulary: %s", ", ".join(unknown))
    return categories, names, queries


# --------------------------------------------------------------------------- which images

def select_images(coco: COCO, annotations: Path, images_root: Path, karpathy: Path, split: str | None) -> list[Record]:
    """The images to evaluate: those of the Karpathy split that are in the annotations file, or with no split every
    image of the annotations file (in its order, from images_root/val2014), dropping those missing on disk."""
    if split is None:
        records = [Record(images_root / "val2014" / info["file_name"], [], int(image_id))
                   for image_id, info in coco.imgs.items()]
    else:
        split_records = karpathy_records(karpathy, images_root, split)
        records = [r for r in split_records if r.image_id in coco.imgs]
        if len(records) < len(split_records):
            log.warning("%d images of split %s are not in %s: left out", len(split_records) - len(records), split,
                        annotations)
    missing = [r for r in records if not r.image.is_file()]
    if missing:
        log.warning("%d images missing on disk, e.g. %s: left out (config key 'coco_images')", len(missing),
                    missing[0].image)
    return [r for r in records if r.image.is_file()]


def load_images(dataset: str, split: str | None) -> tuple[COCO, list[Record], str, list[tuple[str, str]]]:
    """The instances index, the images to evaluate, where they come from, and the images left out because they do
    not decode, as (path, reason): COCO's instances_val2014.json (or the demo world's), or the segments of a
    JSON-lines file's split (default test) as an in-memory COCO index (only one's own images are decoded ahead)."""
    if is_custom(dataset):
        split = split or "test"
        entries = split_entries(Path(dataset), split)
        coco = as_coco(entries, Path(dataset))
        on_disk = [entry for entry in entries if entry.image.is_file()]
        reasons = {entry.line: unreadable(entry.image) for entry in on_disk}  # e.g. a JPEG cut short
        records = [Record(entry.image, [], entry.line) for entry in on_disk if reasons[entry.line] is None]
        broken = [(str(entry.image), reasons[entry.line]) for entry in on_disk if reasons[entry.line] is not None]
        if len(records) < len(entries):
            log.warning("%s: left out %d images missing on disk and %d that cannot be decoded%s", dataset,
                        len(entries) - len(on_disk), len(broken), f", e.g. {broken[0][0]} ({broken[0][1]})"
                        if broken else "")
        if not coco.cats or not records:
            raise UserError(f"{dataset}: no {'segment' if records else 'image on disk'} in split {split!r}; "
                            f"segmentation needs images with \"segments\" (data/README.md)")
        return coco, records, f"{Path(dataset).name} split {split}", broken
    demo = uses_demo(dataset)
    prepare_dataset(dataset)
    if split is not None:
        check_choice("--split", split, SPLITS)
    annotations = config.required_file("coco_annotations", config.path("coco_annotations", demo=demo),
                                       "instances_val2014.json")
    coco = load_coco(annotations)
    records = select_images(coco, annotations, config.path("coco_images", demo=demo),
                            config.path("coco_karpathy", demo=demo), split)
    images_from = f"Karpathy split {split}" if split else annotations.name
    if not records:
        raise UserError(f"no image of {images_from} is both in {annotations} and on disk")
    return coco, records, images_from, []


# --------------------------------------------------------------------------- masks and scores

def original_segmentations(coco: COCO, image_id: int) -> dict[int, list]:
    """Category id -> its ``segmentation`` entries in the image, in annotation order (crowd regions included)."""
    grouped: dict[int, list] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        grouped.setdefault(ann["category_id"], []).append(ann["segmentation"])
    return grouped


def segment(model: Inference, coco: COCO, records: list[Record], categories: list[int], texts: list[str],
            size: int, k: int | None, threshold: float, protocol: str, score: str, batch_size: int, workers: int,
            progress: bool, undecodable: Undecodable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, IoUs (0 where the category is absent; NaN for the original's 0 / 0) and presence of every
    (image, category): each (N, C), N the records whose image decodes; the others are left out (no row, as if
    the split did not hold them) and added to ``undecodable``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    filters = model.filters(texts, k)  # (C, D'), shared by every image
    vectors = model.embed_texts(texts) if score == "similarity" else None  # (C, d)
    column = {category: c for c, category in enumerate(categories)}
    loader = EvalImages([r.image for r in records], model.transform(size), batch_size, workers,
                        model.device.type == "cuda", progress, undecodable)
    scores, ious, present = [], [], []
    for batch in loader:
        maps = model.maps(batch.images)  # (B, D', h, w)
        heat = apply_filters(maps, filters)  # (B, C, h, w)
        if score == "similarity":
            scores.append((model.embed_maps(maps) @ vectors.T).cpu())  # (B, C)
        else:
            scores.append(heat.flatten(2).amax(dim=2).cpu())
        heat = heat.cpu()
        for b, record in enumerate(records[i] for i in batch.indices):
            info = coco.imgs[record.image_id]
            row_iou = torch.zeros(len(categories), dtype=torch.float64)
            row_present = torch.zeros(len(categories), dtype=torch.bool)
            if protocol == "original":
                for category, segmentations in original_segmentations(coco, record.image_id).items():
                    c = column[category]
                    truth = original_truth(segmentations, info["height"], info["width"])
                    row_iou[c] = original_iou(original_prediction(heat[b, c], threshold), truth)
                    row_present[c] = True
            else:
                for category, truth in truth_masks(coco, record.image_id).items():
                    c = column[category]
                    predicted = binarize(upsample(heat[b, c], info["height"], info["width"]), threshold)
                    row_iou[c], row_present[c] = iou(predicted, truth), True
            ious.append(row_iou)
            present.append(row_present)
    loader.finish("no row of theirs in any category's AP")
    return torch.cat(scores), torch.stack(ious), torch.stack(present)


# --------------------------------------------------------------------------- AP

def category_ap(protocol: str, scores: torch.Tensor, ious: torch.Tensor, present: torch.Tensor,
                threshold: float) -> float | None:
    """AP in percent of one category (columns of the (N, C) results) at one IoU threshold, by the protocol's rule;
    None without positives."""
    if protocol == "original":
        ap = original_average_precision(ious.tolist(), present.tolist(), threshold)
    else:
        ap = average_precision(scores, present & (ious >= threshold), int(present.sum()))
    return None if ap is None else 100.0 * ap


def category_table(protocol: str, categories: list[int], names: dict[int, str], queries: dict[int, str],
                   scores: torch.Tensor, ious: torch.Tensor,
                   present: torch.Tensor) -> tuple[dict[str, dict[str, Any]], dict[str, float | None]]:
    """Per category name: its query, positives, mean IoU over the images that have it (NaN left out) and AP at each
    of :data:`IOU_THRESHOLDS`; and mAP at each, the mean over the categories with positives (None without any)."""
    per_category, means = {}, {}
    for c, category in enumerate(categories):
        positives = int(present[:, c].sum())
        known = present[:, c] & ~ious[:, c].isnan()
        entry = {"query": queries[category], "positives": positives,
                 "mean_iou": float(ious[known, c].mean()) if bool(known.any()) else None}
        for t in IOU_THRESHOLDS:
            entry[f"AP@{t}"] = category_ap(protocol, scores[:, c], ious[:, c], present[:, c], t)
        per_category[names[category]] = entry
    evaluated = [e for e in per_category.values() if e["positives"]]
    for t in IOU_THRESHOLDS:
        means[f"mAP@{t}"] = sum(e[f"AP@{t}"] for e in evaluated) / len(evaluated) if evaluated else None
    return per_category, means


def per_image_rows(protocol: str, records: list[Record], categories: list[int], names: dict[int, str],
                   scores: torch.Tensor, ious: torch.Tensor, present: torch.Tensor) -> list[dict[str, Any]]:
    """One row per (image, category): presence, IoU (None for the original's 0 / 0) and, ranked, the score."""
    return [{"image_id": item.image_id, "category": names[category], "present": bool(present[i, c]),
             "iou": None if ious[i, c].isnan() else float(ious[i, c]),
             **({} if protocol == "original" else {"score": float(scores[i, c])})}
            for i, item in enumerate(records) for c, category in enumerate(categories)]
