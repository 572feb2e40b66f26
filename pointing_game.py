"""Pointing game (paper §4.3): does the peak of a phrase's heatmap (eq. 9) fall inside the phrase's region?

    python pointing_game.py -p runs/demo/best.pth.tar
    python pointing_game.py -p model.pth.tar --split test --json runs/pg.json --per-phrase --results results.json
    python pointing_game.py -p model.pth.tar --tolerance 15        # also count peaks within 15 px of the box
    python pointing_game.py -p runs/das2019/best.pth.tar --dataset flickr30k_entities   # Das et al. 2019's benchmark
    python pointing_game.py -p runs/das2019/best.pth.tar --dataset flickr30k_entities --protocol das2019  # their rule

--dataset coco (or demo, the demo world in the same formats): phrases are the Visual Genome region descriptions
(config key vg_dir) of images that are also COCO val2014 images (or, with --split, images of that Karpathy split, to
keep clear of training images). The image file is the COCO one, found through the cocoid of Karpathy's split file.
--dataset FILE.jsonl (one's own data, data/README.md): phrases are each image's "regions" of --split (default test),
boxes in the image's own pixels.
--dataset flickr30k_entities (or demo_entities): every bracketed phrase of the captions of a Flickr30K Entities split
(--split, default test; config keys flickr_entities and flickr_images); a hit is a point in ANY box of the phrase's
coreference chain. Phrases of chains without a box (not visual, no box, scene) are skipped and counted; with
--scene-as-image a scene chain's box is the whole image. Accuracy is also given per entity type (a phrase counts
under each of its types). Each image is resized to SIZE x SIZE (default: the checkpoint's test size rounded up to
whole grid cells, the paper's 416, a 13 x 13 map); the boxes are rescaled from the annotation's image frame to the
same frame as the peak.

Both systems (model.arch dsve and matchmap) point: the heatmap of a phrase is the model's text filter applied at
every position (DSVE: eq. 9 with k; matchmap: the mean of its words' matchmaps, k unused).

--protocol says where the heatmap's arg-max cell points and what a hit is (misc/eval/localization.py):
  original (default)  the original release's rule: the cell's top-left pixel (col W/w, row H/h), a hit only
                      strictly inside the box (bx < x < bx + w, by < y < by + h); arg-max ties in column-major order
  centre              the cell's centre ((col + .5) W/w, (row + .5) H/h), a hit inside the box, edges included
  das2019             Das et al. 2019's code (Flickr30K Entities only): the map bilinearly resized to SIZE x SIZE
                      (default: the checkpoint's train.test_size, their 224), the arg-max pixel's centre,
                      every box of the phrase its own trial (edges included), the fraction of hits per caption,
                      then the mean over captions; the any-box accuracy at the same point is reported beside it.
                      --swap-xy reproduces their code's comparison of the arg-max's row with the box's x range and
                      its column with the y range (theirs; the default compares x with x)
--context says how a phrase is read: phrase (the phrase's words alone) or caption (the whole caption through the
matchmap's LSTM, the phrase's filter the mean of its words' in-context outputs, as Das et al. do; Flickr30K Entities
and matchmap checkpoints only). Default: caption for a matchmap on Flickr30K Entities, phrase otherwise.
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
from pathlib import Path

from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.errors import UserError, check_choice
from misc.store import results

log = logging.getLogger("pointing_game")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # The defaults named in the help are misc.eval.pointing.DATASETS, misc.eval.localization.PAPER_SIZE and
    # POINTING_K (the paper's), written out so that --help imports no torch (tests/test_help.py checks they agree).
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("--dataset",
                        help="coco | demo | flickr30k_entities | demo_entities | a JSON-lines file with regions "
                             "(default: the checkpoint's dataset, Visual Genome phrases)")
    parser.add_argument("--split",
                        help="only images of this Karpathy split (default: every COCO val2014 image); with Flickr30K "
                             "Entities: train, val or test (default test); with a JSON-lines file: any of its splits "
                             "(default test)")
    parser.add_argument("--scene-as-image", action="store_true",
                        help="Flickr30K Entities: a scene chain without a box points at the whole image (default: "
                             "skipped)")
    add_size_arg(parser, default_text="the checkpoint's test size rounded up to whole grid cells: 416 for the paper's")
    parser.add_argument("--k", type=positive_int,
                        help="maps summed per phrase (default 180, the paper's for d = 2400; round(0.075 d) for "
                             "smaller d); DSVE only")
    parser.add_argument("--protocol", default="original",
                        help="where a peak points and what a hit is: original (default), centre or das2019; see "
                             "above")
    parser.add_argument("--swap-xy", action="store_true",
                        help="das2019 only: compare the arg-max's row with x and its column with y, as their code "
                             "does")
    parser.add_argument("--context", help="phrase | caption: read a phrase alone or in its caption (see above)")
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.size is not None and args.size < 32:
        raise UserError(f"--size {args.size}: images must be at least 32 pixels (one cell of the maps)")
    if args.overlays and args.overlays.exists() and not args.overlays.is_dir():
        raise UserError(f"--overlays {args.overlays}: exists and is not a folder; give a folder for the PNGs")
    if args.tolerance < 0:
        raise UserError(f"--tolerance {args.tolerance:g}: pixels, at least 0")
    from misc.data.decoded import Undecodable
    from misc.eval import pointing
    from misc.eval.localization import DAS2019, POINTING_K, POINTING_PROTOCOLS
    from misc.inference import Inference

    check_choice("--protocol", args.protocol, (*POINTING_PROTOCOLS, DAS2019))
    if args.swap_xy and args.protocol != DAS2019:
        raise UserError("--swap-xy reproduces Das et al.'s code: it needs --protocol das2019")
    if args.context is not None:
        check_choice("--context", args.context, ("phrase", "caption"))
    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    size = args.size or (model.test_size if args.protocol == DAS2019 else model.localization_size)
    items, skipped, source = pointing.load_items(model, args.dataset, args.split, args.limit, args.min_words,
                                                 args.scene_as_image)
    entities = source["images_from"].startswith("Flickr30K Entities")
    if args.protocol == DAS2019 and not entities:
        raise UserError("--protocol das2019 scores captions: it needs --dataset flickr30k_entities or demo_entities")
    context = args.context or ("caption" if entities and model.model.config.arch == "matchmap" else "phrase")
    if not items:
        reasons = pointing.skip_counts(skipped)
        raise UserError(f"no phrase to evaluate in {source['images_from']} (skipped: {reasons or 'none'})")
    k = model.choose_k(args.k, POINTING_K)
    log.info("pointing game: %d phrases of %d images, %dx%d, k=%s, context %s on %s",
             sum(len(i.phrases) for i in items), len(items), size, size, k, context, model.device)
    undecodable = Undecodable("image", "its phrases skipped", source["unreadable"])
    rows = pointing.point(model, items, size, k, args.protocol, args.tolerance, args.batch_size,
                          args.workers if args.workers is not None else 2, not args.no_progress, context, args.swap_xy,
                          undecodable)
    overlaid = items[:args.overlay_images] if args.overlays else []
    shown = max(sum(len(item.phrases) for item in overlaid), 1)
    with results.spooled() as spool:  # the rows go to disk as they come (millions of phrases, bounded memory)
        tally, first = pointing.play(rows, args.protocol, spool if args.json and args.per_phrase else None, shown)
        items, unscored = pointing.left_out(items, undecodable)  # images that failed to decode in the loop
        skipped += unscored
        reasons = pointing.skip_counts(skipped)
        metrics = tally.metrics(len(items), len(skipped))
        # The paper's Table 3 is DSVE on Visual Genome phrases: no reference for the matchmap or Flickr30K Entities.
        paper = pointing.PAPER if model.model.config.arch == "dsve" and not metrics["per_type"] else None
        entry = results.record("pointing_game", checkpoint=args.checkpoint, dataset=source["dataset"],
                               split=source["split"], size=size, protocol=args.protocol, metrics=metrics,
                               settings={"k": k, "tolerance": args.tolerance, "min_words": args.min_words,
                                         "grid": first[0]["grid"], "context": context, "swap_xy": args.swap_xy},
                               images_from=source["images_from"], skipped_reasons=reasons,
                               unreadable_images=results.unreadable_images(undecodable.listed()),
                               **({"paper": paper} if paper else {}))
        print(f"pointing game: {tally.phrases} phrases of {len(items)} images ({source['images_from']}), "
              f"{size}x{size}, k={k if k is not None else 'n/a'}, context {context}, protocol {args.protocol}"
              f"{' (x/y swapped as in their code)' if args.swap_xy else ''}: "
              f"hit = {pointing.hit_rule(args.protocol, args.tolerance)}")
        for key, name in (("accuracy", "accuracy       "), ("center_baseline", "centre baseline"),
                          ("any_box_accuracy", "any-box        ")):
            if key not in metrics:
                continue
            reference = f"   (paper {paper[key]} %)" if paper else ""
            print(f"  {name} {metrics[key]:6.2f} %{reference}")
        for kind, row in metrics["per_type"].items():
            print(f"  {kind:<15} {row['accuracy']:6.2f} %   centre {row['center_baseline']:6.2f} %   "
                  f"({row['phrases']} phrases)")
        if skipped:
            print(f"  skipped {len(skipped)} phrases: " + ", ".join(f"{r} {c}" for r, c in reasons.items()))
        rows = {"per_phrase": spool.rows(), "skipped_phrases": skipped} if args.per_phrase else None
        results.save(entry, args.json, args.results, args.results_key, rows)
        if args.overlays:
            written = pointing.write_overlays(model, [i for i in overlaid if i.path not in undecodable], first, size,
                                              k, args.protocol, args.overlays, context)
            print(f"  overlays: {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    run(main)
