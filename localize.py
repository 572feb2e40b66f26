"""Where in an image is each text query? Heatmap overlays (eq. 9) as in the paper's Fig. 1.

    python localize.py -p runs/demo/best.pth.tar -i photo.jpg -t "two glasses" -t "a burger" -o out.png
    python localize.py -p model.pth.tar -i photo.jpg -t "a dog" -t "a cat" --shared-scale --size 320
    python localize.py -p runs/das2019/best.pth.tar -i photo.jpg --caption "a dog chases a cat" -t "a cat"
    python localize.py -p runs/das2019/best.pth.tar -i photo.jpg --caption "a dog chases a cat" --per-word

One panel per query: the image under the query's heatmap in a perceptual colour map with its colour bar, the
heatmap's peak marked with a dot, and above it the query, its image-text score and the words the model does not
know; several queries make a grid. Each panel's colours span its own map, or with --shared-scale one scale for all,
so that panels compare. The image is decoded as every command decodes a photo (EXIF orientation applied, 16-bit
scaled to 8 bits), resized to SIZE x SIZE for the network (default 416, the paper's: a 13 x 13 map for ResNet-152)
and the heatmaps are spread back over the whole image.

Matchmap checkpoints only: with --caption each query is a phrase of that caption, read in its context as Das et al.
do (the LSTM runs over the whole caption; the phrase's map is the mean of its words' in-context maps; its score is
the caption's); --per-word gives one map per word of the caption instead of the queries. DSVE embeds a sentence as
one vector and refuses both in one line.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from misc.cli import (add_checkpoint_args, add_device_args, add_size_arg, add_words_arg, parser_for, positive_int,
                      run)

log = logging.getLogger("localize")
COLORMAPS = ("viridis", "inferno", "magma", "plasma", "cividis")  # perceptually uniform, readable in grey


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("-i", "--image", type=Path, required=True, help="image file")
    parser.add_argument("-t", "--text", action="append", default=[], metavar="QUERY",
                        help="a text query; repeat for several (with --caption: words of the caption)")
    parser.add_argument("--caption", help="matchmap: read each query in this caption's context")
    parser.add_argument("--per-word", action="store_true", help="with --caption: one map per word of the caption")
    parser.add_argument("-o", "--out", type=Path, default=Path("localize.png"), help="PNG to write")
    add_size_arg(parser, default_text="the checkpoint's test size rounded up to whole grid cells: 416 for the paper's")
    parser.add_argument("--k", type=positive_int,
                        help="maps summed per query (default 180, the paper's for d = 2400; round(0.075 d) for "
                             "smaller d)")
    parser.add_argument("--shared-scale", action="store_true",
                        help="one colour scale for every panel (default: each panel spans its own map)")
    parser.add_argument("--colormap", choices=COLORMAPS, default=COLORMAPS[0],
                        help=f"colour map (default {COLORMAPS[0]})")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1] (default 0.5)")
    add_words_arg(parser)
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # torch and matplotlib are imported once the arguments are known: --help and argument errors stay instant
    from misc.errors import UserError, check_number
    from misc.data.images import read_image
    from misc.inference import Inference
    from misc.visualize import figure_size, save_png

    check_number("--alpha", args.alpha, low=0, high=1)
    if args.per_word and (args.caption is None or args.text):
        raise UserError("--per-word maps every word of --caption: give --caption and no -t")
    if not args.per_word and not args.text:
        raise UserError("give a query with -t (or --caption with --per-word)")
    image = read_image(args.image)
    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    size = args.size or model.localization_size
    found = model.heatmaps(image, args.text, size, args.k, args.caption, args.per_word)
    for text in found.texts:
        if model.known_words(text) == 0:
            log.warning("no word of %r is in the vocabulary: its heatmap means little", text)
    save_png(found.figure(args.shared_scale, alpha=args.alpha, colormap=args.colormap), args.out)
    width, height = figure_size(*image.size, len(found.texts))
    h, w = found.maps.shape[-2:]
    print(f"{args.out}: {width}x{height} px, {len(found.texts)} heatmap(s) of {h}x{w} ({size}x{size} "
          f"input, k={found.k if found.k is not None else 'n/a'}, "
          f"{'one colour scale' if args.shared_scale else 'a colour scale per panel'})")
    for text, (x, y), score, unknown in zip(found.texts, found.peaks.tolist(), found.scores.tolist(), found.unknown):
        missing = f", unknown words: {', '.join(unknown)}" if unknown else ""
        print(f"  peak of {text!r} at x={x:.0f}, y={y:.0f} of {image.size[0]}x{image.size[1]}, score {score:.3f}"
              f"{missing}")


if __name__ == "__main__":
    run(main)
