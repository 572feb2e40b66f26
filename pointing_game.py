"""Pointing game (paper §4.3): does the peak of a phrase's heatmap (eq. 9) fall inside the phrase's region?

    python pointing_game.py -p runs/demo/best.pth.tar
    python pointing_game.py -p model.pth.tar --split test --json runs/pg.json --per-phrase --results results.json
    python pointing_game.py -p model.pth.tar --tolerance 15        # also count peaks within 15 px of the box

Phrases are the Visual Genome region descriptions (config key vg_dir) of images that are also COCO val2014 images
(or, with --split, images of that Karpathy split, to keep clear of training images). The image file is the COCO one,
found through the cocoid of Karpathy's split file. Each image is resized to SIZE x SIZE (default 416, a 13 x 13 map);
its phrase's box is rescaled from the VG image frame to the same frame as the peak.

--protocol says where the heatmap's arg-max cell points and what a hit is (misc/localization.py):
  original (default)  the original release's rule: the cell's top-left pixel (col W/w, row H/h), a hit only
                      strictly inside the box (bx < x < bx + w, by < y < by + h); arg-max ties in column-major order
  centre              the cell's centre ((col + .5) W/w, (row + .5) H/h), a hit inside the box, edges included
The centre baseline is a map that always peaks at the cell holding the image centre (h // 2, w // 2), put through
the same rule (the original code has no baseline; at 416 px it points at (192, 192) under original, (208, 208)
under centre). Skipped phrases (no words,
shorter than --min-words, no word in the vocabulary, an empty box, the image file missing) are counted by reason.
Paper (d = 2400, k = 180): 33.8 % accuracy, centre baseline 19.5 %.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc import config
from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.errors import UserError
from misc.datasets import SPLITS, ImageDataset, coco_files, read_regions, uses_demo
from misc.files import update_results, write_json
from misc.images import decode_image
from misc.inference import Inference
from misc.localization import (POINTING_PROTOCOLS, cell_points, choose_k, heatmaps, peak_cells, pointing_hits,
                               scale_boxes)
from misc.visualize import overlays, save_png

log = logging.getLogger("pointing_game")
PAPER = {"accuracy": 33.8, "center_baseline": 19.5}
PAPER_K = 180


@dataclass
class Phrase:
    region_id: int
    text: str
    box: tuple[float, float, float, float]  # x, y, width, height in the VG image frame


@dataclass
class Item:
    """One image and its kept phrases."""

    coco_id: int
    vg_id: int
    path: Path
    vg_size: tuple[float, float]  # VG's width, height: the frame of the boxes
    phrases: list[Phrase] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("--dataset", choices=["coco", "demo"], help="data paths (default: the checkpoint's dataset)")
    parser.add_argument("--split", choices=list(SPLITS),
                        help="only images of this Karpathy split (default: every COCO val2014 image)")
    add_size_arg(parser, default=416)
    parser.add_argument("--k", type=positive_int,
                        help=f"maps summed per phrase (default {PAPER_K}, the paper's for d = 2400; round(0.075 d) "
                             f"for smaller d)")
    parser.add_argument("--protocol", choices=POINTING_PROTOCOLS, default="original",
                        help="where a peak cell points and what a hit is (default original; see above)")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="PX",
                        help="also count a peak within PX pixels (SIZE x SIZE frame) of the box as a hit")
    parser.add_argument("--min-words", type=positive_int, default=1, help="skip phrases with fewer words (default 1)")
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    add_words_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    add_output_args(parser, "pointing_game")
    parser.add_argument("--per-phrase", action="store_true", help="with --json: include every phrase's result")
    parser.add_argument("--overlays", type=Path, metavar="DIR",
                        help="also write DIR/pointing_<cocoid>.png: every phrase's heatmap and peak, hit or miss")
    parser.add_argument("--overlay-images", type=positive_int, default=3, metavar="N",
                        help="with --overlays: the first N images (default 3)")
    add_device_args(parser)
    return parser.parse_args(argv)


def skip_reason(text: str, box: tuple[float, ...], model: Inference, min_words: int) -> str | None:
    words = [token for token in model.words.tokens(text) if any(c.isalnum() for c in token)]
    if not words:
        return "no words"
    if len(words) < min_words:
        return "too short"
    if model.known_words(text) == 0:
        return "no word in vocabulary"
    if box[2] <= 0 or box[3] <= 0:
        return "empty box"
    return None


def select(vg: list[tuple[object, list]], files: dict[int, Path], model: Inference,
           min_words: int) -> tuple[list[Item], list[dict]]:
    """The images and phrases to evaluate, and the skipped phrases with their reasons."""
    items, skipped = [], []
    for image, regions in vg:
        item = Item(int(image.coco_id), int(image.id), files[int(image.coco_id)],
                    (float(image.width), float(image.height)))
        missing = not item.path.is_file()
        for region in regions:
            box = (float(region.x), float(region.y), float(region.width), float(region.height))
            reason = "image missing" if missing else skip_reason(region.phrase or "", box, model, min_words)
            if reason:
                skipped.append({"region_id": int(region.id), "coco_id": item.coco_id, "phrase": region.phrase,
                                "reason": reason})
            else:
                item.phrases.append(Phrase(int(region.id), region.phrase, box))
        if item.phrases:
            items.append(item)
    return items, skipped


def point(model: Inference, items: list[Item], size: int, k: int, protocol: str, tolerance: float,
          batch_size: int, workers: int, progress: bool) -> list[dict]:
    """Peak cell of every phrase's heatmap, the point the protocol makes of it in the size x size frame, and whether
    it and the centre baseline hit the phrase's box."""
    loader = DataLoader(ImageDataset([item.path for item in items], model.transform(size)), batch_size=batch_size,
                        num_workers=workers, pin_memory=model.device.type == "cuda")
    strict = protocol == "original"
    weight, results, start = model.weight, [], 0
    for images in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        batch = items[start:start + len(images)]
        start += len(images)
        maps = model.maps(images)  # (B, D', h, w)
        grid = tuple(maps.shape[-2:])
        texts = model.embed_texts([p.text for item in batch for p in item.phrases])  # (M, d)
        padded = texts.new_zeros(len(batch), max(len(item.phrases) for item in batch), texts.shape[1])
        row = 0
        for b, item in enumerate(batch):
            padded[b, :len(item.phrases)] = texts[row:row + len(item.phrases)]
            row += len(item.phrases)
        cells = peak_cells(heatmaps(maps, weight, padded, k), column_major=strict).cpu()  # (B, P, 2)
        points = cell_points(cells, grid, size, size, protocol)
        centre = cell_points(torch.tensor([grid[0] // 2, grid[1] // 2]), grid, size, size, protocol)
        for b, item in enumerate(batch):
            n = len(item.phrases)
            boxes = scale_boxes(torch.tensor([p.box for p in item.phrases]), item.vg_size, (size, size))
            hits = pointing_hits(points[b, :n], boxes, tolerance, strict)
            centre_hits = pointing_hits(centre.expand(n, 2), boxes, tolerance, strict)
            for p, box, cell, xy, hit, centre_hit in zip(item.phrases, boxes, cells[b], points[b], hits, centre_hits):
                results.append({"region_id": p.region_id, "image_id": item.coco_id, "vg_image_id": item.vg_id,
                                "phrase": p.text, "grid": list(grid), "peak_cell": cell.tolist(),
                                "point": xy.tolist(), "box": box.tolist(), "hit": bool(hit),
                                "center_hit": bool(centre_hit)})
    return results


def write_overlays(model: Inference, items: list[Item], per_phrase: list[dict], size: int, k: int,
                   protocol: str, folder: Path) -> list[Path]:
    """One figure per image (misc.visualize): each phrase's heatmap over the image with the point the protocol
    makes of its peak, the caption saying whether that point hit the phrase's box."""
    hit = {r["region_id"]: r["hit"] for r in per_phrase}
    written = []
    for item in items:
        image = decode_image(item.path, exif=False)
        texts = [p.text for p in item.phrases]
        maps = model.maps(model.transform(size)(image)[None])
        heat = heatmaps(maps, model.weight, model.embed_texts(texts), k)[0].cpu()  # (P, h, w)
        captions = [f"{p.text} ({'hit' if hit[p.region_id] else 'miss'})" for p in item.phrases]
        path = folder / f"pointing_{item.coco_id}.png"
        cells = peak_cells(heat, column_major=protocol == "original")
        save_png(overlays(image, heat, cell_points(cells, tuple(heat.shape[-2:]), *image.size, protocol).float(),
                          captions), path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.size < 32:
        raise UserError(f"--size {args.size}: images must be at least 32 pixels (one cell of the maps)")
    if args.overlays and args.overlays.exists() and not args.overlays.is_dir():
        raise UserError(f"--overlays {args.overlays}: exists and is not a folder; give a folder for the PNGs")
    if args.tolerance < 0:
        raise UserError(f"--tolerance {args.tolerance:g}: pixels, at least 0")
    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    demo = uses_demo(args.dataset or model.config["train"]["dataset"])
    vg_dir = config.path("vg_dir", demo=demo)
    files = coco_files(config.path("coco_karpathy", demo=demo), config.path("coco_images", demo=demo), args.split)
    items, skipped = select(read_regions(vg_dir, files, args.limit), files, model, args.min_words)
    reasons = dict(Counter(s["reason"] for s in skipped).most_common())
    if not items:
        raise UserError(f"no phrase to evaluate in {vg_dir} (images of COCO "
                          f"{'split ' + args.split if args.split else 'val2014'}; skipped: {reasons or 'none'})")
    k = choose_k(args.k, model.dim, PAPER_K)
    log.info("pointing game: %d phrases of %d images, %dx%d, k=%d on %s", sum(len(i.phrases) for i in items),
             len(items), args.size, args.size, k, model.device)
    per_phrase = point(model, items, args.size, k, args.protocol, args.tolerance, args.batch_size,
                       args.workers if args.workers is not None else 2, not args.no_progress)

    n = len(per_phrase)
    summary = {"accuracy": 100.0 * sum(r["hit"] for r in per_phrase) / n,
               "center_baseline": 100.0 * sum(r["center_hit"] for r in per_phrase) / n,
               "phrases": n, "images": len(items), "skipped": len(skipped), "skipped_reasons": reasons,
               "protocol": args.protocol, "tolerance": args.tolerance, "k": k, "size": args.size,
               "grid": per_phrase[0]["grid"],
               "images_from": f"Karpathy split {args.split}" if args.split else "COCO val2014",
               "checkpoint": str(args.checkpoint), "paper": PAPER}
    hit_rule = {"original": "cell's top-left corner strictly inside the box",
                "centre": "cell's centre inside the box"}[args.protocol]
    if args.tolerance:
        hit_rule += f", or within {args.tolerance:g} px of it (TorchRay convention)"
    print(f"pointing game: {n} phrases of {len(items)} images ({summary['images_from']}), {args.size}x{args.size}, "
          f"k={k}, protocol {args.protocol}: hit = {hit_rule}")
    print(f"  accuracy        {summary['accuracy']:6.2f} %   (paper {PAPER['accuracy']} %)")
    print(f"  centre baseline {summary['center_baseline']:6.2f} %   (paper {PAPER['center_baseline']} %)")
    if skipped:
        print(f"  skipped {len(skipped)} phrases: " + ", ".join(f"{r} {c}" for r, c in reasons.items()))
    if args.json:
        full = dict(summary)
        if args.per_phrase:
            full["per_phrase"], full["skipped_phrases"] = per_phrase, skipped
        write_json(args.json, full)
    if args.overlays:
        written = write_overlays(model, items[:args.overlay_images], per_phrase, args.size, k, args.protocol,
                                 args.overlays)
        print(f"  overlays: {', '.join(str(path) for path in written)}")
    if args.results:
        update_results(args.results, args.results_key, {key: summary[key] for key in (
            "accuracy", "center_baseline", "phrases", "images", "skipped", "skipped_reasons", "protocol",
            "tolerance", "k", "size", "grid", "images_from")})


if __name__ == "__main__":
    run(main)
