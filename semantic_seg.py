"""Weakly supervised semantic segmentation on COCO (paper §4.3): a category's heatmap, thresholded, as its mask.

    python semantic_seg.py -p runs/demo/best.pth.tar
    python semantic_seg.py -p model.pth.tar --split test --threshold 0.45 --json runs/seg.json --results results.json

For each category the query is its name and plural ("cat cats", plurals from inflect). For each image of
the Karpathy split (default test; the images must be in instances_val2014.json, config key coco_annotations), the
image is resized to SIZE x SIZE (default: the checkpoint's test_size, as in retrieval evaluation), the category's
heatmap (eq. 9 with a small k: the paper's 10 of d = 2400, scaled to smaller d) is upsampled to the image's own size
and binarised where it reaches min + t·(max - min) of itself (t = --threshold, default 0.45). The ground truth is the
union of the category's instance masks in the image (polygons and RLE, crowd regions included, via annToMask).

AP. Every (image, category) pair is a prediction, ranked per category by a score: by default the cosine similarity
between the image and the query (the model's own belief that the category is there; --score peak uses the heatmap's
maximum instead). A prediction is a true positive when the category is in the image and the mask's IoU reaches the
threshold (0.3, 0.4, 0.5); images without the category are negatives; an image with the category whose mask misses
still counts among the positives (lost recall). AP is the non-interpolated area under that ranking's precision-recall
curve; mAP is the mean over the categories present in the split. Paper: 0.34 / 0.24 / 0.15 at IoU 0.3 / 0.4 / 0.5.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import inflect
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc import config
from misc.cli import add_device_args, run, update_results, write_json
from misc.config import ConfigError
from misc.datasets import SPLITS, ImageDataset, eval_transform, karpathy_records, load_coco, truth_masks
from misc.engine import resolve_device
from misc.localization import (Localizer, apply_filters, average_precision, binarize, choose_k, iou, load_localizer,
                               text_filters, upsample, uses_demo)

log = logging.getLogger("semantic_seg")
PAPER = {"mAP@0.3": 0.34, "mAP@0.4": 0.24, "mAP@0.5": 0.15}
PAPER_K = 10
_INFLECT = inflect.engine()
ALREADY_PLURAL = {"skis", "scissors"}  # COCO category names
IOU_THRESHOLDS = (0.3, 0.4, 0.5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--checkpoint", type=Path, required=True, help="model checkpoint")
    parser.add_argument("--dataset", choices=["coco", "demo"], help="data paths (default: the checkpoint's dataset)")
    parser.add_argument("--split", default="test", choices=list(SPLITS), help="Karpathy split (default test)")
    parser.add_argument("--size", type=int, help="resize images to SIZE x SIZE (default: the checkpoint's test_size)")
    parser.add_argument("--k", type=int, help=f"maps summed per query (default {PAPER_K}, the paper's for d = 2400; "
                                              f"scaled for smaller d)")
    parser.add_argument("--threshold", type=float, default=0.45,
                        help="mask = heatmap >= min + THRESHOLD * (max - min) (default 0.45)")
    parser.add_argument("--score", choices=["similarity", "peak"], default="similarity",
                        help="ranks the (image, category) predictions for AP: image-query cosine similarity "
                             "(default) or the heatmap's maximum")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--words", type=Path, help="word-vector file (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--results", type=Path, help="add the results as the 'semantic_segmentation' entry")
    add_device_args(parser)
    return parser.parse_args()


def plural(noun: str) -> str:
    """English plural of a category name (inflect); COCO's names that already are plurals stay as they are."""
    return noun if noun in ALREADY_PLURAL else _INFLECT.plural_noun(noun)


def query(name: str) -> str:
    """The paper's category query: name and plural ("cat cats"), the name once when both are the same."""
    many = plural(name)
    return name if many == name else f"{name} {many}"


def segment(localizer: Localizer, coco: COCO, records: list, categories: list[int], texts: torch.Tensor, size: int,
            k: int, threshold: float, score: str, batch_size: int, workers: int,
            progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, IoUs (0 where the category is absent) and presence of every (image, category): each (N, C)."""
    filters = text_filters(localizer.weight, texts, k)  # (C, D'), shared by every image
    column = {category: c for c, category in enumerate(categories)}
    loader = DataLoader(ImageDataset([r.image for r in records], eval_transform(size)), batch_size=batch_size,
                        num_workers=workers, pin_memory=localizer.device.type == "cuda")
    scores, ious, present, start = [], [], [], 0
    for images in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        maps = localizer.maps(images)  # (B, D', h, w)
        heat = apply_filters(maps, filters)  # (B, C, h, w)
        if score == "similarity":
            scores.append((localizer.embed_maps(maps) @ texts.T).cpu())  # (B, C)
        else:
            scores.append(heat.flatten(2).amax(dim=2).cpu())
        heat = heat.cpu()
        for b, record in enumerate(records[start:start + len(images)]):
            info = coco.imgs[record.image_id]
            row_iou, row_present = torch.zeros(len(categories)), torch.zeros(len(categories), dtype=torch.bool)
            for category, truth in truth_masks(coco, record.image_id).items():
                c = column[category]
                predicted = binarize(upsample(heat[b, c], info["height"], info["width"]), threshold)
                row_iou[c], row_present[c] = iou(predicted, truth), True
            ious.append(row_iou)
            present.append(row_present)
        start += len(images)
    return torch.cat(scores), torch.stack(ious), torch.stack(present)


def main() -> None:
    args = parse_args()
    if not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold}: must lie in [0, 1] (a fraction of the heatmap's range)")
    device = resolve_device(args.device)
    localizer = load_localizer(args.checkpoint, args.words, device, args.amp)
    demo = uses_demo(args.dataset or localizer.saved["train"]["dataset"])
    annotations = config.required_file("coco_annotations", config.path("coco_annotations", demo=demo),
                                "instances_val2014.json")
    split_records = karpathy_records(config.path("coco_karpathy", demo=demo), config.path("coco_images", demo=demo),
                                     args.split)
    coco = load_coco(annotations)
    records = [r for r in split_records if r.image_id in coco.imgs]
    if len(records) < len(split_records):
        log.warning("%d images of split %s are not in %s: left out", len(split_records) - len(records), args.split,
                    annotations)
    missing = [r for r in records if not r.image.is_file()]
    if missing:
        log.warning("%d images missing on disk, e.g. %s: left out (config key 'coco_images')", len(missing),
                    missing[0].image)
        records = [r for r in records if r.image.is_file()]
    records = records[:args.limit] if args.limit is not None else records
    if not records:
        raise ConfigError(f"no image of split {args.split} is both in {annotations} and on disk")

    categories = sorted(coco.getCatIds())
    names = {c: coco.cats[c]["name"] for c in categories}
    queries = {c: query(names[c]) for c in categories}
    unknown = [queries[c] for c in categories if localizer.known_words(queries[c]) == 0]
    if unknown:
        log.warning("no word of these queries is in the vocabulary: %s", ", ".join(unknown))
    texts = localizer.encode([queries[c] for c in categories])  # (C, d)
    k = choose_k(args.k, localizer.dim, PAPER_K)
    size = args.size or localizer.saved["train"]["test_size"]
    log.info("semantic segmentation: %d images of split %s, %d categories, %dx%d, k=%d, threshold %.2f on %s",
             len(records), args.split, len(categories), size, size, k, args.threshold, device)
    scores, ious, present = segment(localizer, coco, records, categories, texts, size, k, args.threshold, args.score,
                                    args.batch_size, args.workers if args.workers is not None else 2,
                                    not args.no_progress)

    per_category, means = {}, {}
    for c, category in enumerate(categories):
        positives = int(present[:, c].sum())
        entry = {"query": queries[category], "positives": positives,
                 "mean_iou": float(ious[present[:, c], c].mean()) if positives else None}
        for t in IOU_THRESHOLDS:
            entry[f"AP@{t}"] = average_precision(scores[:, c], present[:, c] & (ious[:, c] >= t), positives)
        per_category[names[category]] = entry
    evaluated = [e for e in per_category.values() if e["positives"]]
    for t in IOU_THRESHOLDS:
        means[f"mAP@{t}"] = sum(e[f"AP@{t}"] for e in evaluated) / len(evaluated) if evaluated else None
    results = {**means, "per_category": per_category, "images": len(records),
               "categories": len(evaluated), "categories_without_positives": len(categories) - len(evaluated),
               "split": args.split, "size": size, "k": k, "threshold": args.threshold, "score": args.score,
               "threshold_rule": "heatmap >= min + threshold * (max - min)", "checkpoint": str(args.checkpoint),
               "paper": PAPER}

    print(f"semantic segmentation: {len(records)} images of split {args.split}, {len(evaluated)} categories "
          f"with positives, {size}x{size}, k={k}, threshold {args.threshold:g}, score {args.score}")
    print(f"  {'IoU':<8}{'mAP':>8}{'paper':>8}")
    for t in IOU_THRESHOLDS:
        value = means[f"mAP@{t}"]
        print(f"  {t:<8}{'-' if value is None else f'{value:.3f}':>8}{PAPER[f'mAP@{t}']:>8}")
    if args.json:
        write_json(args.json, results)
    if args.results:
        update_results(args.results, "semantic_segmentation",
                       {key: results[key] for key in (*means, "per_category", "images", "categories", "split",
                                                      "size", "k", "threshold", "score")})


if __name__ == "__main__":
    run(main)
