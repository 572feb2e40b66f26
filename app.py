"""The web page: where is each phrase in an image, and which images of a collection match a text or an image.

    python app.py -p runs/demo/best.pth.tar                                   # then open http://127.0.0.1:7860
    python app.py -p runs/demo/best.pth.tar --features images.npz             # with a Search tab
    python app.py -p model.pth.tar --features features/ --host 0.0.0.0 --port 8080

Localization: upload an image (or pick one of the demo world's), type phrases one a line; each phrase's heatmap
(eq. 9) is drawn over the image with its peak, its cosine score with the image (eq. 3, 4) and the words the
vocabulary lacks. Search (with --features: a .npz of image_features_extraction.py or text_features_extraction.py,
or a folder of them): a text or an image query, the best matches as thumbnails with their scores.

Needs gradio (in requirements.txt); nothing is fetched from the network.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from misc.cli import add_checkpoint_args, add_device_args, add_size_arg, add_words_arg, parser_for, positive_int, run

log = logging.getLogger("app")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    add_words_arg(parser)
    parser.add_argument("--features", type=Path, metavar="FILE_OR_FOLDER",
                        help="feature file(s) to search (.npz of image_features_extraction.py)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive_int, default=7860, help="port to listen on (default 7860)")
    add_size_arg(parser, default_text="the checkpoint's test size rounded up to whole grid cells: 416 for the paper's")
    parser.add_argument("--k", type=positive_int,
                        help="maps summed per phrase (eq. 9; default: the paper's 180 for d = 2400, scaled to d)")
    parser.add_argument("--concurrency", type=positive_int, default=1,
                        help="requests computed at once; more browsers wait in gradio's queue (default 1)")
    add_device_args(parser, workers=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from misc import webapp  # torch and gradio load only once the arguments are known to be right
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    searchable = webapp.load_collections(args.features, args.checkpoint) if args.features else None
    examples = webapp.example_images()
    log.info("serving %s on http://%s:%d (%d example images, %s)", args.checkpoint, args.host, args.port,
             len(examples), f"{len(searchable.collections)} collection(s)" if searchable else "no collection")
    page = webapp.build_ui(model, searchable, args.size or model.localization_size, args.k, examples, args.concurrency)
    webapp.serve(page, args.host, args.port, examples)


if __name__ == "__main__":
    run(main)
