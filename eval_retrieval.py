"""Cross-modal retrieval on COCO-style splits: R@1/5/10, median and mean rank (1-based), rsum.

    python eval_retrieval.py -p runs/demo/best.pth.tar                # test split of the checkpoint's dataset
    python eval_retrieval.py -p model.pth.tar --dataset coco --split test --json results.json
    python eval_retrieval.py --features features.npz                  # images (N, d), captions (5N, d)
    python eval_retrieval.py -p model.pth.tar --dataset mine.jsonl --split test   # one's own data (data/README.md)

Protocols: "1k" averages folds of 1000 images (5000 captions); "full" ranks against every test image (5k on COCO).
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
from misc.files import atomic_path, update_results, write_json
from misc.retrieval import caption_owner_default, evaluate, format_table

log = logging.getLogger("eval_retrieval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_args(source, required=False)
    source.add_argument("--features", type=Path, help="precomputed features .npz (images, captions[, owner])")
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
    return parser.parse_args(argv)


def load_features(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images (N, d), captions (M, d) float32 and the owner image of each caption, from a features .npz."""
    try:
        with np.load(path) as data:
            images, captions = data["images"], data["captions"]
            owner = data.get("owner")
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable .npz file ({error})") from error
    except KeyError as error:
        raise UserError(f"{path}: needs arrays 'images' (N, d) and 'captions' (5N, d); missing {error}") from error
    if images.ndim != 2 or captions.ndim != 2 or images.shape[1] != captions.shape[1]:
        raise UserError(f"{path}: 'images' {images.shape} and 'captions' {captions.shape} must be (N, d), (M, d)")
    if owner is None:
        try:
            owner = caption_owner_default(len(images), len(captions))
        except ValueError as error:
            raise UserError(f"{path}: {error}; or store an 'owner' array (image index of each caption)") from error
    return images.astype(np.float32, copy=False), captions.astype(np.float32, copy=False), owner


def embed_split(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed the split's images and captions with the checkpoint (the model, image and word libraries are
    imported here, only on this path)."""
    from misc import config, demo
    from misc.datasets import load_records
    from misc.engine import encode_records
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    dataset = args.dataset or model.config["train"]["dataset"]
    if dataset == "demo":
        demo.ensure(config.DEMO_DIR)
    records = load_records(dataset, args.split)
    size = args.size or (256 if args.protocol == "crop" else model.test_size)
    log.info("embedding %d images (%dx%d) and their captions from %s on %s", len(records), size, size, dataset,
             model.device)
    embedded = encode_records(model.model, records, model.words, model.device, size, batch_size=args.batch_size,
                              workers=args.workers if args.workers is not None else 2, amp=model.amp,
                              progress=not args.no_progress, protocol=args.protocol)
    return tuple(np.asarray(x) for x in embedded)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.features:
        images, captions, owner = load_features(args.features)
    else:
        images, captions, owner = embed_split(args)
    if args.save_features:
        with atomic_path(args.save_features) as temporary:
            np.savez(temporary, images=images, captions=captions, owner=owner)
    try:
        results = evaluate(images, captions, owner, protocols=tuple(args.protocols))
    except ValueError as error:
        raise UserError(str(error)) from error
    print(f"{len(images)} images, {len(captions)} captions")
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    if args.results:
        update_results(args.results, args.results_key, results)


if __name__ == "__main__":
    run(main)
