"""Where in an image is each text query? Heatmap overlays (eq. 9) as in the paper's Fig. 1.

    python localize.py -p runs/demo/best.pth.tar -i photo.jpg -t "two glasses" -t "a burger" -o out.png

One panel per query: the image under the query's heatmap in false colours, the heatmap's peak marked with a dot and
the query written below; several queries make a grid. The image is resized to SIZE x SIZE for the network (default:
the checkpoint's test_size) and the heatmaps are spread back over the whole image.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from misc.cli import (add_checkpoint_args, add_device_args, add_size_arg, add_words_arg, parser_for, positive_int,
                      run)
from misc.errors import UserError
from misc.images import read_image
from misc.inference import Inference
from misc.localization import apply_filters, peak_location
from misc.visualize import figure_size, overlays, save_png
from misc.words import tokenize

log = logging.getLogger("localize")
PAPER_K = 180


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("-i", "--image", type=Path, required=True, help="image file")
    parser.add_argument("-t", "--text", action="append", required=True, metavar="QUERY",
                        help="a text query; repeat for several")
    parser.add_argument("-o", "--out", type=Path, default=Path("localize.png"), help="PNG to write")
    add_size_arg(parser)
    parser.add_argument("--k", type=positive_int,
                        help=f"maps summed per query (default {PAPER_K}, the paper's for d = 2400; round(0.075 d) for "
                             f"smaller d)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default 0.5)")
    add_words_arg(parser)
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for text in args.text:
        if not any(any(c.isalnum() for c in token) for token in tokenize(text)):
            raise UserError(f"query {text!r} has no words")
    image = read_image(args.image)
    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    for text in args.text:
        if model.known_words(text) == 0:
            log.warning("no word of %r is in the vocabulary: its heatmap means little", text)
    size = args.size or model.test_size
    k = model.choose_k(args.k, PAPER_K)

    maps = model.maps(model.transform(size)(image)[None])  # (1, C, h, w)
    heat = apply_filters(maps, model.filters(args.text, k))[0].cpu()  # (T, h, w)
    peaks = peak_location(heat, *image.size)  # (T, 2) in the image's pixels
    save_png(overlays(image, heat, peaks, args.text, args.alpha), args.out)
    width, height = figure_size(*image.size, len(args.text))
    print(f"{args.out}: {width}x{height} px, {len(args.text)} heatmap(s) of {heat.shape[1]}x{heat.shape[2]} "
          f"({size}x{size} input, k={k if k is not None else 'n/a'})")
    for text, (x, y) in zip(args.text, peaks.tolist()):
        print(f"  peak of {text!r} at x={x:.0f}, y={y:.0f} of {image.size[0]}x{image.size[1]}")


if __name__ == "__main__":
    run(main)
