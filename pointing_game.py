"""Pointing game (paper §4.3): does the peak of a phrase's heatmap (eq. 9) fall inside the phrase's region?

    python pointing_game.py -p runs/demo/best.pth.tar
    python pointing_game.py -p model.pth.tar --split test --json runs/pg.json --per-phrase --results results.json
    python pointing_game.py -p model.pth.tar --tolerance 15        # also count peaks within 15 px of the box
    python pointing_game.py -p runs/das2019/best.pth.tar --dataset flickr30k_entities   # Das et al. 2019's benchmark

--dataset coco (or demo, the demo world in the same formats): phrases are the Visual Genome region descriptions
(config key vg_dir) of images that are also COCO val2014 images (or, with --split, images of that Karpathy split, to
keep clear of training images). The image file is the COCO one, found through the cocoid of Karpathy's split file.
--dataset FILE.jsonl (one's own data, data/README.md): phrases are each image's "regions" of --split (default test),
boxes in the image's own pixels.
--dataset flickr30k_entities (or demo_entities): every bracketed phrase of the captions of a Flickr30K Entities split
(--split, default test; config keys flickr_entities and flickr_images); a hit is a point in ANY box of the phrase's
coreference chain. Phrases of chains without a box (not visual, no box, scene) are skipped and counted; with
--scene-as-image a scene chain's box is the whole image. Accuracy is also given per entity type (a phrase counts
under each of its types). Each image is resized to SIZE x SIZE (default 416, a 13 x 13 map); the boxes are rescaled
from the annotation's image frame to the same frame as the peak.

Both systems (model.arch dsve and matchmap) point: the heatmap of a phrase is the model's text filter applied at
every position (DSVE: eq. 9 with k; matchmap: the mean of its words' matchmaps, k unused).

--protocol says where the heatmap's arg-max cell points and what a hit is (misc/eval/localization.py):
  original (default)  the original release's rule: the cell's top-left pixel (col W/w, row H/h), a hit only
                      strictly inside the box (bx < x < bx + w, by < y < by + h); arg-max ties in column-major order
  centre              the cell's centre ((col + .5) W/w, (row + .5) H/h), a hit inside the box, edges included
The centre baseline is a map that always peaks at the cell holding the image centre (h // 2, w // 2), put through
the same rule (the original code has no baseline; at 416 px it points at (192, 192) under original, (208, 208)
under centre). Skipped phrases (no words, shorter than --min-words, no word in the vocabulary, an empty box, the
image file missing, and for Flickr30K Entities a chain without a box) are counted by reason.
Paper (d = 2400, k = 180, Visual Genome): 33.8 % accuracy, centre baseline 19.5 %. Accuracies are in percent;
--json and --results write the record of docs/results.md.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misc import config
from misc.store import results
from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.data.jsonl import Entry, image_size, split_entries
from misc.errors import UserError, check_choice, did_you_mean

if TYPE_CHECKING:  # torch and the model code are imported after the arguments are parsed (a fast --help)
    from misc.data.flickr_entities import EntitiesImage
    from misc.inference import Inference

log = logging.getLogger("pointing_game")
PAPER = {"accuracy": 33.8, "center_baseline": 19.5}
PAPER_K = 180
DATASETS = ("coco", "demo", "flickr30k_entities", "demo_entities")  # the last two: Flickr30K Entities files


@dataclass
class Phrase:
    text: str
    boxes: list[tuple[float, float, float, float]]  # x, y, width, height in the item's frame
    info: dict[str, Any]  # what names the phrase in the per-phrase rows
    types: tuple[str, ...] = ()  # Flickr30K Entities types


@dataclass
class Item:
    """One image and its kept phrases."""

    image_id: int | str
    path: Path
    frame: tuple[float, float]  # width, height of the frame of the boxes
    phrases: list[Phrase] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("--dataset",
                        help=f"{' | '.join(DATASETS)} | a JSON-lines file with regions (default: the checkpoint's "
                             f"dataset, Visual Genome phrases)")
    parser.add_argument("--split",
                        help="only images of this Karpathy split (default: every COCO val2014 image); with Flickr30K "
                             "Entities: train, val or test (default test); with a JSON-lines file: any of its splits "
                             "(default test)")
    parser.add_argument("--scene-as-image", action="store_true",
                        help="Flickr30K Entities: a scene chain without a box points at the whole image (default: "
                             "skipped)")
    add_size_arg(parser, default=416)
    parser.add_argument("--k", type=positive_int,
                        help=f"maps summed per phrase (default {PAPER_K}, the paper's for d = 2400; round(0.075 d) "
                             f"for smaller d); DSVE only")
    parser.add_argument("--protocol", default="original",
                        help="where a peak cell points and what a hit is: original (default) or centre; see above")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="PX",
                        help="also count a peak within PX pixels (SIZE x SIZE frame) of the box as a hit")
    parser.add_argument("--min-words", type=positive_int, default=1, help="skip phrases with fewer words (default 1)")
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    add_words_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    add_output_args(parser, "pointing_game")
    parser.add_argument("--per-phrase", action="store_true", help="with --json: include every phrase's result")
    parser.add_argument("--overlays", type=Path, metavar="DIR",
                        help="also write DIR/pointing_<image id>.png: every phrase's heatmap and peak, hit or miss")
    parser.add_argument("--overlay-images", type=positive_int, default=3, metavar="N",
                        help="with --overlays: the first N images (default 3)")
    add_device_args(parser)
    return parser.parse_args(argv)


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
    from misc.data import flickr_entities

    items, skipped = [], []
    for image in images:
        item = Item(image.image_id, image.path, (float(image.annotation.width), float(image.annotation.height)))
        for number, sentence in enumerate(image.sentences):
            for phrase in sentence.phrases:
                boxes, reason = flickr_entities.entity_boxes(image.annotation, phrase.entity, scene_as_image)
                info = {"sentence": number, "first_word": phrase.first_word, "entity": phrase.entity,
                        "types": list(phrase.types)}
                keep(item, Phrase(phrase.text, boxes, info, phrase.types), reason, model, min_words, skipped)
        if item.phrases:
            items.append(item)
    return items, skipped


def point(model: Inference, items: list[Item], size: int, k: int | None, protocol: str, tolerance: float,
          batch_size: int, workers: int, progress: bool) -> list[dict]:
    """Peak cell of every phrase's heatmap, the point the protocol makes of it in the size x size frame, and whether
    it and the centre baseline hit one of the phrase's boxes."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from misc.data.datasets import ImageDataset
    from misc.data.flickr_entities import phrase_hit
    from misc.eval.localization import cell_points, peak_cells, scale_boxes
    from models.heatmaps import apply_filters

    loader = DataLoader(ImageDataset([item.path for item in items], model.transform(size)), batch_size=batch_size,
                        num_workers=workers, pin_memory=model.device.type == "cuda")
    strict = protocol == "original"
    with torch.no_grad():
        scored, start = [], 0
        for images in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
            batch = items[start:start + len(images)]
            start += len(images)
            maps = model.maps(images)  # (B, C, h, w)
            grid = tuple(maps.shape[-2:])
            filters = model.filters([p.text for item in batch for p in item.phrases], k)  # (M, C)
            padded = filters.new_zeros(len(batch), max(len(item.phrases) for item in batch), filters.shape[1])
            row = 0
            for b, item in enumerate(batch):
                padded[b, :len(item.phrases)] = filters[row:row + len(item.phrases)]
                row += len(item.phrases)
            cells = peak_cells(apply_filters(maps, padded), column_major=strict).cpu()  # (B, P, 2)
            points = cell_points(cells, grid, size, size, protocol)
            centre = cell_points(torch.tensor([grid[0] // 2, grid[1] // 2]), grid, size, size, protocol)
            for b, item in enumerate(batch):
                for p, cell, xy in zip(item.phrases, cells[b], points[b]):
                    boxes = scale_boxes(torch.tensor(p.boxes), item.frame, (size, size))
                    scored.append({**p.info, "image_id": item.image_id, "phrase": p.text, "grid": list(grid),
                                    "peak_cell": cell.tolist(), "point": xy.tolist(),
                                    **({"box": boxes[0].tolist()} if len(boxes) == 1 else {}),
                                    "boxes": boxes.tolist(),
                                    "hit": phrase_hit(xy, boxes, tolerance, strict),
                                    "center_hit": phrase_hit(centre, boxes, tolerance, strict)})
    return scored


def per_type(per_phrase: list[dict]) -> dict[str, dict[str, float]]:
    """Accuracy and centre baseline (percent) per Flickr30K Entities type, a phrase counting under each of its
    types."""
    from misc.data.flickr_entities import ENTITY_TYPES

    table = {}
    for kind in ENTITY_TYPES:
        rows = [r for r in per_phrase if kind in r.get("types", ())]
        if rows:
            table[kind] = {"phrases": len(rows), "accuracy": 100.0 * sum(r["hit"] for r in rows) / len(rows),
                           "center_baseline": 100.0 * sum(r["center_hit"] for r in rows) / len(rows)}
    return table


def write_overlays(model: Inference, items: list[Item], per_phrase: list[dict], size: int, k: int | None,
                   protocol: str, folder: Path) -> list[Path]:
    """One figure per image (misc.visualize): each phrase's heatmap over the image with its ground-truth boxes and
    the point the protocol made of its peak (both read from the phrase's row, so the figure shows what was
    scored), the title saying whether that point hit one of the boxes."""
    import torch

    from misc.data.images import decode_image
    from misc.eval.localization import scale_boxes
    from models.heatmaps import apply_filters
    from misc.visualize import overlays, save_png

    written, rows = [], iter(per_phrase)
    for item in items:
        image = decode_image(item.path, exif=False)
        maps = model.maps(model.transform(size)(image)[None])
        heat = apply_filters(maps, model.filters([p.text for p in item.phrases], k))[0].cpu()  # (P, h, w)
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


def select_custom(entries: list[Entry], model: Inference, min_words: int) -> tuple[list[Item], list[dict]]:
    """The regions of a JSON-lines file's images (boxes in the stored image's pixels), and the skipped ones."""
    items, skipped = [], []
    for entry in entries:
        item = Item(entry.line, entry.image, tuple(float(side) for side in image_size(entry.image)))
        for number, (phrase, box) in enumerate(entry.regions):
            keep(item, Phrase(phrase, [box], {"region": number}), None, model, min_words, skipped)
        if item.phrases:
            items.append(item)
    return items, skipped


def load_items(args: argparse.Namespace, model: Inference) -> tuple[list[Item], list[dict], dict[str, str | None]]:
    """The images and phrases of --dataset, the skipped phrases, and where they come from: dataset, split and
    images_from (in words)."""
    from misc.data import flickr_entities
    from misc.data.datasets import SPLITS, coco_files, is_custom, prepare_dataset, read_regions, uses_demo

    trained_on = model.config["train"]["dataset"]
    dataset = args.dataset or ("flickr30k_entities" if trained_on == "flickr30k" else trained_on)
    if is_custom(dataset):
        split = args.split or "test"
        entries = split_entries(Path(dataset), split)
        items, skipped = select_custom(entries[:args.limit], model, args.min_words)
        return items, skipped, {"dataset": dataset, "split": split,
                                "images_from": f"{Path(dataset).name} split {split}"}
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset}: unknown{did_you_mean(dataset, DATASETS)}; choose one of "
                        f"{', '.join(DATASETS)} or a JSON-lines file with regions (data/README.md)")
    entities = dataset in ("flickr30k_entities", "demo_entities")
    demo = uses_demo({"flickr30k_entities": "coco", "demo_entities": "demo"}.get(dataset, dataset))
    prepare_dataset(dataset)
    if entities:
        split = args.split or "test"
        if split not in flickr_entities.SPLITS:
            raise UserError(f"--split {split}: Flickr30K Entities has {', '.join(flickr_entities.SPLITS)}")
        root = config.path("flickr_entities", demo=demo)
        images = flickr_entities.load_images(root, config.path("flickr_images", demo=demo), split, args.limit)
        items, skipped = select_entities(images, model, args.min_words, args.scene_as_image)
        return items, skipped, {"dataset": dataset, "split": split, "images_from": f"Flickr30K Entities {split}"}
    if args.split is not None:
        check_choice("--split", args.split, SPLITS)
    vg_dir = config.path("vg_dir", demo=demo)
    files = coco_files(config.path("coco_karpathy", demo=demo), config.path("coco_images", demo=demo), args.split)
    items, skipped = select_regions(read_regions(vg_dir, files, args.limit), files, model, args.min_words)
    return items, skipped, {"dataset": dataset, "split": args.split,
                            "images_from": f"Karpathy split {args.split}" if args.split else "COCO val2014"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.size < 32:
        raise UserError(f"--size {args.size}: images must be at least 32 pixels (one cell of the maps)")
    if args.overlays and args.overlays.exists() and not args.overlays.is_dir():
        raise UserError(f"--overlays {args.overlays}: exists and is not a folder; give a folder for the PNGs")
    if args.tolerance < 0:
        raise UserError(f"--tolerance {args.tolerance:g}: pixels, at least 0")
    from misc.inference import Inference
    from misc.eval.localization import POINTING_PROTOCOLS, choose_k

    check_choice("--protocol", args.protocol, POINTING_PROTOCOLS)
    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    items, skipped, source = load_items(args, model)
    reasons = dict(Counter(s["reason"] for s in skipped).most_common())
    if not items:
        raise UserError(f"no phrase to evaluate in {source['images_from']} (skipped: {reasons or 'none'})")
    k = choose_k(args.k, model.dim, PAPER_K) if model.model.config.arch == "dsve" else None
    log.info("pointing game: %d phrases of %d images, %dx%d, k=%s on %s", sum(len(i.phrases) for i in items),
             len(items), args.size, args.size, k, model.device)
    per_phrase = point(model, items, args.size, k, args.protocol, args.tolerance, args.batch_size,
                       args.workers if args.workers is not None else 2, not args.no_progress)

    n = len(per_phrase)
    metrics = {"accuracy": 100.0 * sum(r["hit"] for r in per_phrase) / n,
               "center_baseline": 100.0 * sum(r["center_hit"] for r in per_phrase) / n,
               "phrases": n, "images": len(items), "skipped": len(skipped), "per_type": per_type(per_phrase)}
    # The paper's Table 3 is DSVE on Visual Genome phrases: no reference for the matchmap or Flickr30K Entities.
    paper = PAPER if model.model.config.arch == "dsve" and not metrics["per_type"] else None
    entry = results.record("pointing_game", checkpoint=args.checkpoint, dataset=source["dataset"],
                           split=source["split"], size=args.size, protocol=args.protocol, metrics=metrics,
                           settings={"k": k, "tolerance": args.tolerance, "min_words": args.min_words,
                                     "grid": per_phrase[0]["grid"]},
                           images_from=source["images_from"], skipped_reasons=reasons,
                           **({"paper": paper} if paper else {}))
    hit_rule = {"original": "cell's top-left corner strictly inside the box",
                "centre": "cell's centre inside the box"}[args.protocol]
    if args.tolerance:
        hit_rule += f", or within {args.tolerance:g} px of it (TorchRay convention)"
    print(f"pointing game: {n} phrases of {len(items)} images ({source['images_from']}), {args.size}x{args.size}, "
          f"k={k if k is not None else 'n/a'}, protocol {args.protocol}: hit = {hit_rule}")
    for key, name in (("accuracy", "accuracy       "), ("center_baseline", "centre baseline")):
        reference = f"   (paper {paper[key]} %)" if paper else ""
        print(f"  {name} {metrics[key]:6.2f} %{reference}")
    for kind, row in metrics["per_type"].items():
        print(f"  {kind:<15} {row['accuracy']:6.2f} %   centre {row['center_baseline']:6.2f} %   "
              f"({row['phrases']} phrases)")
    if skipped:
        print(f"  skipped {len(skipped)} phrases: " + ", ".join(f"{r} {c}" for r, c in reasons.items()))
    rows = {"per_phrase": per_phrase, "skipped_phrases": skipped} if args.per_phrase else None
    results.save(entry, args.json, args.results, args.results_key, rows)
    if args.overlays:
        written = write_overlays(model, items[:args.overlay_images], per_phrase, args.size, k, args.protocol,
                                 args.overlays)
        print(f"  overlays: {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    run(main)
