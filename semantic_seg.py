"""Weakly supervised semantic segmentation on COCO (paper §4.3): a category's heatmap, thresholded, as its mask.

    python semantic_seg.py -p runs/demo/best.pth.tar
    python semantic_seg.py -p model.pth.tar --json runs/seg.json --per-image --results results.json
    python semantic_seg.py -p model.pth.tar --protocol ranked --split test

Each image is resized to SIZE x SIZE (default: the checkpoint's test_size, 400 for the paper's model) and each
category's heatmap is eq. 9 with a small k (the paper's 10 of d = 2400, scaled to smaller d). --protocol chooses
everything else (misc/eval/segmentation.py):

original (default): what the original release's semantic_seg.py computes. Images: every image of
  instances_val2014.json (config key coco_annotations), or of --split. Query: name + " " + name + "s" ("bus buss").
  Prediction: the heatmap rescaled to uint8, resized to 200 x 200 (bilinear, Pillow), kept where it is strictly
  above t · (max - min) (t = --threshold, 0.45). Truth: the category's RLE masks and polygons on the image,
  resized to 200 x 200 (nearest). AP per category: every image sorted by IoU (IoU 0 without the category), walked
  from the second item, a true positive when IoU > the IoU threshold and a false positive otherwise; mAP is the
  mean over the categories with at least one image.
ranked: the paper's text. Images: the Karpathy split (default test). Query: name and plural from inflect ("bus
  buses"). Prediction: the heatmap upsampled to the image's own size (bilinear) where it reaches min + t·(max - min).
  Truth: the union of the category's instance masks (annToMask). Every (image, category) pair is a prediction ranked
  by a score (--score: image-query cosine similarity, or the heatmap's maximum), a true positive when the category
  is there and IoU >= the IoU threshold; non-interpolated AP over the images that have the category.

--dataset FILE.jsonl (one's own data, data/README.md): the images of --split (default test); the categories are
the union of the split's segment categories, their masks the segments' polygons and RLE (pycocotools, as on COCO).

Paper: mAP 34 / 24 / 15 % at IoU 0.3 / 0.4 / 0.5. AP and mAP are in percent (IoU, a ratio, stays in [0, 1]); --json
and --results write the record of docs/results.md.
"""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from misc import config
from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.errors import UserError, check_choice
from misc.store import results

if TYPE_CHECKING:  # the libraries below are imported after the arguments are parsed (a fast --help)
    import inflect
    import torch
    from pycocotools.coco import COCO

    from misc.data.datasets import Record
    from misc.inference import Inference

log = logging.getLogger("semantic_seg")
PAPER = {"mAP@0.3": 34.0, "mAP@0.4": 24.0, "mAP@0.5": 15.0}  # percent
PAPER_K = 10
ALREADY_PLURAL = {"skis", "scissors"}  # COCO category names
IOU_THRESHOLDS = (0.3, 0.4, 0.5)
PROTOCOLS = ("original", "ranked")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("--dataset", help="coco | demo | a JSON-lines file with segments (default: the checkpoint's "
                                          "dataset)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="original",
                        help="original release's metric (default) or the paper's ranked AP; see above")
    parser.add_argument("--split",
                        help="Karpathy split (default: every annotated image for original, test for ranked); with a "
                             "JSON-lines file: any of its splits (default test)")
    add_size_arg(parser)
    parser.add_argument("--k", type=positive_int,
                        help=f"maps summed per query (default {PAPER_K}, the paper's for d = 2400; scaled for "
                             f"smaller d)")
    parser.add_argument("--threshold", type=float, default=0.45,
                        help="binarisation of a heatmap, a fraction of its range (default 0.45)")
    parser.add_argument("--score", choices=["similarity", "peak"], default="similarity",
                        help="ranked: orders the (image, category) predictions: image-query cosine similarity "
                             "(default) or the heatmap's maximum")
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    add_words_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    add_output_args(parser, "semantic_segmentation")
    parser.add_argument("--per-image", action="store_true", help="with --json: every (image, category) row")
    add_device_args(parser)
    return parser.parse_args(argv)


@functools.cache
def _inflect() -> inflect.engine:
    import inflect

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


def original_segmentations(coco: COCO, image_id: int) -> dict[int, list]:
    """Category id -> its ``segmentation`` entries in the image, in annotation order (crowd regions included)."""
    grouped: dict[int, list] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        grouped.setdefault(ann["category_id"], []).append(ann["segmentation"])
    return grouped


def segment(model: Inference, coco: COCO, records: list[Record], categories: list[int], texts: list[str],
            size: int, k: int | None, threshold: float, protocol: str, score: str, batch_size: int, workers: int,
            progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, IoUs (0 where the category is absent; NaN for the original's 0 / 0) and presence of every
    (image, category): each (N, C)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from misc.data.datasets import ImageDataset, truth_masks
    from misc.eval.localization import upsample
    from models.heatmaps import apply_filters
    from misc.eval.segmentation import binarize, iou, original_iou, original_prediction, original_truth

    filters = model.filters(texts, k)  # (C, D'), shared by every image
    vectors = model.embed_texts(texts) if score == "similarity" else None  # (C, d)
    column = {category: c for c, category in enumerate(categories)}
    loader = DataLoader(ImageDataset([r.image for r in records], model.transform(size)), batch_size=batch_size,
                        num_workers=workers, pin_memory=model.device.type == "cuda")
    scores, ious, present, start = [], [], [], 0
    for images in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        maps = model.maps(images)  # (B, D', h, w)
        heat = apply_filters(maps, filters)  # (B, C, h, w)
        if score == "similarity":
            scores.append((model.embed_maps(maps) @ vectors.T).cpu())  # (B, C)
        else:
            scores.append(heat.flatten(2).amax(dim=2).cpu())
        heat = heat.cpu()
        for b, record in enumerate(records[start:start + len(images)]):
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
        start += len(images)
    return torch.cat(scores), torch.stack(ious), torch.stack(present)


def select_images(coco: COCO, annotations: Path, images_root: Path, karpathy: Path, split: str | None) -> list[Record]:
    """The images to evaluate: those of the Karpathy split that are in the annotations file, or with no split every
    image of the annotations file (in its order, from images_root/val2014), dropping those missing on disk."""
    from misc.data.datasets import Record, karpathy_records

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


def load_images(dataset: str, split: str | None) -> tuple[COCO, list[Record], str]:
    """The instances index, the images to evaluate and where they come from: COCO's instances_val2014.json (or the
    demo world's), or the segments of a JSON-lines file's split (default test) as an in-memory COCO index."""
    from misc.data.jsonl import as_coco, split_entries
    from misc.data.datasets import SPLITS, Record, is_custom, load_coco, prepare_dataset, uses_demo

    if is_custom(dataset):
        split = split or "test"
        entries = split_entries(Path(dataset), split)
        coco = as_coco(entries, Path(dataset))
        records = [Record(entry.image, [], entry.line) for entry in entries if entry.image.is_file()]
        if len(records) < len(entries):
            log.warning("%d images of %s are missing on disk: left out", len(entries) - len(records), dataset)
        if not coco.cats or not records:
            raise UserError(f"{dataset}: no {'segment' if records else 'image on disk'} in split {split!r}; "
                            f"segmentation needs images with \"segments\" (data/README.md)")
        return coco, records, f"{Path(dataset).name} split {split}"
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
    return coco, records, images_from


def category_ap(protocol: str, scores: torch.Tensor, ious: torch.Tensor, present: torch.Tensor,
                threshold: float) -> float | None:
    """AP in percent of one category (columns of the (N, C) results) at one IoU threshold, by the protocol's rule;
    None without positives."""
    from misc.eval.segmentation import average_precision, original_average_precision

    if protocol == "original":
        ap = original_average_precision(ious.tolist(), present.tolist(), threshold)
    else:
        ap = average_precision(scores, present & (ious >= threshold), int(present.sum()))
    return None if ap is None else 100.0 * ap


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold}: must lie in [0, 1] (a fraction of the heatmap's range)")
    split = args.split or ("test" if args.protocol == "ranked" else None)
    from misc.inference import Inference
    from misc.eval.segmentation import ORIGINAL_SIDE

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    dataset = args.dataset or model.config["train"]["dataset"]
    coco, records, images_from = load_images(dataset, split)
    records = records[:args.limit] if args.limit is not None else records

    categories = sorted(coco.getCatIds())
    names = {c: coco.cats[c]["name"] for c in categories}
    queries = {c: query(names[c], args.protocol) for c in categories}
    unknown = [queries[c] for c in categories if model.known_words(queries[c]) == 0]
    if unknown:
        log.warning("no word of these queries is in the vocabulary: %s", ", ".join(unknown))
    texts = [queries[c] for c in categories]
    k = model.choose_k(args.k, PAPER_K)
    size = args.size or model.test_size
    log.info("semantic segmentation (%s): %d images of %s, %d categories, %dx%d, k=%s, threshold %.2f on %s",
             args.protocol, len(records), images_from, len(categories), size, size, k, args.threshold, model.device)
    scores, ious, present = segment(model, coco, records, categories, texts, size, k, args.threshold,
                                    args.protocol, args.score, args.batch_size,
                                    args.workers if args.workers is not None else 2, not args.no_progress)

    per_category, means = {}, {}
    for c, category in enumerate(categories):
        positives = int(present[:, c].sum())
        known = present[:, c] & ~ious[:, c].isnan()
        entry = {"query": queries[category], "positives": positives,
                 "mean_iou": float(ious[known, c].mean()) if bool(known.any()) else None}
        for t in IOU_THRESHOLDS:
            entry[f"AP@{t}"] = category_ap(args.protocol, scores[:, c], ious[:, c], present[:, c], t)
        per_category[names[category]] = entry
    evaluated = [e for e in per_category.values() if e["positives"]]
    for t in IOU_THRESHOLDS:
        means[f"mAP@{t}"] = sum(e[f"AP@{t}"] for e in evaluated) / len(evaluated) if evaluated else None
    rule = ("heatmap (uint8, 200x200) > threshold * (max - min)" if args.protocol == "original"
            else "heatmap >= min + threshold * (max - min)")
    settings = {"k": k, "threshold": args.threshold, "threshold_rule": rule,
                **({"mask_side": ORIGINAL_SIDE} if args.protocol == "original" else {"score": args.score})}
    entry = results.record("semantic_seg", checkpoint=args.checkpoint, dataset=str(dataset), split=split, size=size,
                   protocol=args.protocol, metrics={**means, "images": len(records), "categories": len(evaluated)},
                   settings=settings, images_from=images_from, queries={names[c]: queries[c] for c in categories},
                   categories_without_positives=len(categories) - len(evaluated), per_category=per_category,
                   paper=PAPER)

    print(f"semantic segmentation ({args.protocol}): {len(records)} images of {images_from}, {len(evaluated)} "
          f"categories with positives, {size}x{size}, k={k if k is not None else 'n/a'}, threshold {args.threshold:g}")
    print(f"  {'IoU':<8}{'mAP %':>8}{'paper':>8}")
    for t in IOU_THRESHOLDS:
        value = means[f"mAP@{t}"]
        print(f"  {t:<8}{'-' if value is None else f'{value:.1f}':>8}{PAPER[f'mAP@{t}']:>8.1f}")
    rows = None
    if args.per_image:
        rows = {"per_image": [
            {"image_id": item.image_id, "category": names[category], "present": bool(present[i, c]),
             "iou": None if ious[i, c].isnan() else float(ious[i, c]),
             **({} if args.protocol == "original" else {"score": float(scores[i, c])})}
            for i, item in enumerate(records) for c, category in enumerate(categories)]}
    results.save(entry, args.json, args.results, args.results_key, rows)


if __name__ == "__main__":
    run(main)
