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
import logging

from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.errors import UserError
from misc.store import results

log = logging.getLogger("semantic_seg")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # The protocols and the default k named here are misc.eval.segment.PROTOCOLS and
    # misc.eval.localization.SEGMENTATION_K, written out so that --help imports no torch (tests/test_help.py).
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("--dataset", help="coco | demo | a JSON-lines file with segments (default: the checkpoint's "
                                          "dataset)")
    parser.add_argument("--protocol", choices=("original", "ranked"), default="original",
                        help="original release's metric (default) or the paper's ranked AP; see above")
    parser.add_argument("--split",
                        help="Karpathy split (default: every annotated image for original, test for ranked); with a "
                             "JSON-lines file: any of its splits (default test)")
    add_size_arg(parser)
    parser.add_argument("--k", type=positive_int,
                        help="maps summed per query (default 10, the paper's for d = 2400; scaled for smaller d)")
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold}: must lie in [0, 1] (a fraction of the heatmap's range)")
    split = args.split or ("test" if args.protocol == "ranked" else None)
    from misc.data.decoded import Undecodable
    from misc.eval import segment
    from misc.eval.localization import SEGMENTATION_K
    from misc.eval.segmentation import ORIGINAL_SIDE
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    dataset = args.dataset or model.config["train"]["dataset"]
    coco, records, images_from, unreadable = segment.load_images(dataset, split)
    records = records[:args.limit] if args.limit is not None else records
    categories, names, queries = segment.category_queries(coco, args.protocol, model)
    k = model.choose_k(args.k, SEGMENTATION_K)
    size = args.size or model.test_size
    log.info("semantic segmentation (%s): %d images of %s, %d categories, %dx%d, k=%s, threshold %.2f on %s",
             args.protocol, len(records), images_from, len(categories), size, size, k, args.threshold, model.device)
    undecodable = Undecodable("image", "left out", unreadable)
    scores, ious, present = segment.segment(model, coco, records, categories, [queries[c] for c in categories],
                                            size, k, args.threshold, args.protocol, args.score, args.batch_size,
                                            args.workers if args.workers is not None else 2, not args.no_progress,
                                            undecodable)
    records = undecodable.kept(records, lambda record: record.image)  # the rows' images

    per_category, means = segment.category_table(args.protocol, categories, names, queries, scores, ious, present)
    evaluated = sum(1 for e in per_category.values() if e["positives"])
    settings = {"k": k, "threshold": args.threshold, "threshold_rule": segment.THRESHOLD_RULES[args.protocol],
                **({"mask_side": ORIGINAL_SIDE} if args.protocol == "original" else {"score": args.score})}
    entry = results.record("semantic_seg", checkpoint=args.checkpoint, dataset=str(dataset), split=split, size=size,
                           protocol=args.protocol, metrics={**means, "images": len(records), "categories": evaluated},
                           settings=settings, images_from=images_from,
                           queries={names[c]: queries[c] for c in categories},
                           categories_without_positives=len(categories) - evaluated, per_category=per_category,
                           unreadable_images=results.unreadable_images(undecodable.listed()),
                           paper=segment.PAPER)

    print(f"semantic segmentation ({args.protocol}): {len(records)} images of {images_from}, {evaluated} "
          f"categories with positives, {size}x{size}, k={k if k is not None else 'n/a'}, threshold {args.threshold:g}")
    print(f"  {'IoU':<8}{'mAP %':>8}{'paper':>8}")
    for t in segment.IOU_THRESHOLDS:
        value = means[f"mAP@{t}"]
        print(f"  {t:<8}{'-' if value is None else f'{value:.1f}':>8}{segment.PAPER[f'mAP@{t}']:>8.1f}")
    rows = None
    if args.per_image:
        rows = {"per_image": segment.per_image_rows(args.protocol, records, categories, names, scores, ious, present)}
    results.save(entry, args.json, args.results, args.results_key, rows)


if __name__ == "__main__":
    run(main)
