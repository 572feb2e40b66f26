"""Cross-modal retrieval on COCO-style splits: R@1/5/10 (percent), median and mean rank (1-based), rsum.

    python eval_retrieval.py -p runs/demo/best.pth.tar                # test split of the checkpoint's dataset
    python eval_retrieval.py -p model.pth.tar --dataset coco --split test --json results.json
    python eval_retrieval.py -p model.pth.tar --dataset mine.jsonl --split test   # one's own data (data/README.md)
    python eval_retrieval.py --features features.npz                  # what --save-features wrote
    python eval_retrieval.py --features images.npz --text-features captions.npz   # what the extraction commands wrote

Protocols: "1k" averages folds of 1000 images (5000 captions); "full" ranks against every test image (5k on COCO).

--features with --text-features pairs the outputs of image_features_extraction.py (IMAGES.npz) and
text_features_extraction.py --tsv (CAPTIONS.npz), either of them a folder of the sharded layout: each line of the
captions file is IMAGE<TAB>CAPTION (or a .jsonl row with path and caption), IMAGE being the image's path as
IMAGES.npz stores it (relative to the extracted folder, e.g. val2014/x.jpg). Every caption must
name a stored image and every image needs a caption; both files must come from the same checkpoint.
--features alone reads an .npz of arrays images (N, d), captions (M, d) and optionally owner (M,), the image row of
each caption (default: five consecutive captions per image), as --save-features writes it.
The JSON written by --json and --results is the record of docs/results.md.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.config import EVAL_PROTOCOLS
from misc.errors import UserError
from misc.eval.features import Embedded, load_features, paired_features
from misc.eval.retrieval import evaluate, format_table
from misc.store import results
from misc.store.files import atomic_path

log = logging.getLogger("eval_retrieval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_args(source, required=False)
    source.add_argument("--features", type=Path,
                        help="precomputed features: IMAGES.npz of image_features_extraction.py (with "
                             "--text-features), or an .npz of images, captions[, owner] (see above)")
    parser.add_argument("--text-features", type=Path, metavar="CAPTIONS.npz",
                        help="with --features IMAGES.npz: text_features_extraction.py --tsv output, lines "
                             "IMAGE<TAB>CAPTION")
    parser.add_argument("--split", default="test",
                        help="split to evaluate (default: test; a JSON-lines file: any of its splits)")
    parser.add_argument("--dataset", help="coco | flickr30k | demo | JSON-lines file (default: the checkpoint's)")
    parser.add_argument("--protocol", choices=EVAL_PROTOCOLS, default="resize",
                        help="resize: SIZE x SIZE (default); crop: smaller side SIZE, centre crop 224/256 of it")
    add_size_arg(parser, default_text="the checkpoint's test_size for resize, 256 for crop")
    add_words_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--protocols", nargs="+", default=["1k", "full"], choices=["1k", "full"])
    parser.add_argument("--save-features", type=Path, help="also write the embeddings to this .npz")
    add_output_args(parser, "retrieval")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.text_features and not args.features:
        parser.error("--text-features goes with --features IMAGES.npz")
    return args


def embed_split(args: argparse.Namespace) -> Embedded:
    """Embed the split's images and captions with the checkpoint (the model, image and word libraries are
    imported here, only on this path)."""
    from misc.data.datasets import load_split, prepare_dataset
    from misc.data.decoded import Undecodable
    from misc.eval.encode import encode_records
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    dataset = args.dataset or model.config["train"]["dataset"]
    prepare_dataset(dataset)
    records, unreadable = load_split(dataset, args.split)
    undecodable = Undecodable("image", "left out of the ranking with its captions", unreadable)
    size = args.size or (256 if args.protocol == "crop" else model.test_size)
    log.info("embedding %d images (%dx%d) and their captions from %s on %s", len(records), size, size, dataset,
             model.device)
    embedded = encode_records(model.model, records, model.words, model.device, size, batch_size=args.batch_size,
                              workers=args.workers if args.workers is not None else 2, amp=model.amp,
                              progress=not args.no_progress, protocol=args.protocol, undecodable=undecodable)
    images, captions, owner = (np.asarray(x) for x in embedded)
    return Embedded(images, captions, owner, {"checkpoint": args.checkpoint, "dataset": str(dataset),
                                              "split": args.split, "size": size, "protocol": args.protocol,
                                              "unreadable_images": results.unreadable_images(undecodable.listed())})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.text_features:
        embedded = paired_features(args.features, args.text_features)
    elif args.features:
        embedded = load_features(args.features)
    else:
        embedded = embed_split(args)
    if args.save_features:
        with atomic_path(args.save_features) as temporary:
            np.savez(temporary, images=embedded.images, captions=embedded.captions, owner=embedded.owner)
    try:
        metrics = evaluate(embedded.images, embedded.captions, embedded.owner, protocols=tuple(args.protocols))
    except ValueError as error:
        raise UserError(str(error)) from error
    if not metrics:
        raise UserError(f"--protocols 1k needs at least 1000 images, here {len(embedded.images)}: add full")
    print(f"{len(embedded.images)} images, {len(embedded.captions)} captions (R@k in %)")
    print(format_table(metrics))
    source = {"checkpoint": None, "dataset": None, "split": None, "size": None, "protocol": None, **embedded.source}
    entry = results.record("eval_retrieval", **source, metrics={"images": len(embedded.images),
                                                                "captions": len(embedded.captions), **metrics})
    results.save(entry, args.json, args.results, args.results_key)


if __name__ == "__main__":
    run(main)
