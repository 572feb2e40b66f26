"""Cross-modal retrieval on COCO-style splits: R@1/5/10 (percent), median and mean rank (1-based), rsum.

    python eval_retrieval.py -p runs/demo/best.pth.tar                # test split of the checkpoint's dataset
    python eval_retrieval.py -p model.pth.tar --dataset coco --split test --json results.json
    python eval_retrieval.py -p model.pth.tar --dataset mine.jsonl --split test   # one's own data (data/README.md)
    python eval_retrieval.py --features features.npz                  # what --save-features wrote
    python eval_retrieval.py --features images.npz --text-features captions.npz   # what the extraction commands wrote

Protocols: "1k" averages folds of 1000 images (5000 captions); "full" ranks against every test image (5k on COCO).

--features with --text-features pairs the outputs of image_features_extraction.py (IMAGES.npz) and
text_features_extraction.py --tsv (CAPTIONS.npz): each line of the captions file is IMAGE<TAB>CAPTION, IMAGE being
the image's path as IMAGES.npz stores it (relative to the extracted folder, e.g. val2014/x.jpg). Every caption must
name a stored image and every image needs a caption; both files must come from the same checkpoint.
--features alone reads an .npz of arrays images (N, d), captions (M, d) and optionally owner (M,), the image row of
each caption (default: five consecutive captions per image), as --save-features writes it.
The JSON written by --json and --results is the record of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from misc.store.arrays import TextColumn, npz_array, npz_names
from misc.cli import (add_checkpoint_args, add_device_args, add_output_args, add_size_arg, add_words_arg, parser_for,
                      positive_int, run)
from misc.config import EVAL_PROTOCOLS
from misc.errors import UserError
from misc.store.files import atomic_path
from misc.store import results
from misc.eval.retrieval import caption_owner_default, evaluate, format_table

log = logging.getLogger("eval_retrieval")


@dataclass
class Embedded:
    """Embeddings to evaluate and where they come from (the provenance fields of the results record)."""

    images: np.ndarray  # (N, d) float32
    captions: np.ndarray  # (M, d) float32
    owner: np.ndarray  # (M,) image row of each caption
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, checkpoint_sha256, dataset, split, size, ...


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


def load_features(path: Path) -> Embedded:
    """images (N, d), captions (M, d) float32 and the owner image of each caption, from a --save-features .npz."""
    try:
        with np.load(path) as data:
            images, captions = data["images"], data["captions"]
            owner = data.get("owner")
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable .npz file ({error})") from error
    except KeyError as error:
        raise UserError(f"{path}: needs arrays 'images' (N, d) and 'captions' (5N, d), or is IMAGES.npz of "
                        f"image_features_extraction.py (then add --text-features CAPTIONS.npz); missing {error}"
                        ) from error
    if images.ndim != 2 or captions.ndim != 2 or images.shape[1] != captions.shape[1]:
        raise UserError(f"{path}: 'images' {images.shape} and 'captions' {captions.shape} must be (N, d), (M, d)")
    if owner is None:
        try:
            owner = caption_owner_default(len(images), len(captions))
        except ValueError as error:
            raise UserError(f"{path}: {error}; or store an 'owner' array (image index of each caption)") from error
    return Embedded(images.astype(np.float32, copy=False), captions.astype(np.float32, copy=False), owner,
                    {"dataset": str(path)})


def _extracted(path: Path, labels: str, command: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Features, the label of each row (``labels``: an array or a text column) and the config of an extraction."""
    try:
        names = npz_names(path)
        if "features" not in names or labels not in names | {name.removesuffix("_utf8") for name in names}:
            raise UserError(f"{path}: expected 'features' and '{labels}', as {command} writes them")
        features = npz_array(path, "features")
        rows = TextColumn(path, labels).tolist() if f"{labels}_utf8" in names else npz_array(path, labels).tolist()
        config = json.loads(str(npz_array(path, "config"))) if "config" in names else {}
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}: not a readable feature file of {command} ({error})") from error
    if features.ndim != 2 or len(rows) != len(features):
        raise UserError(f"{path}: {features.shape} features for {len(rows)} {labels}")
    return features.astype(np.float32, copy=False), rows, config


def _examples(values: list[str], shown: int = 3) -> str:
    return ", ".join(repr(value) for value in values[:shown]) + (", ..." if len(values) > shown else "")


def paired_features(images_path: Path, captions_path: Path) -> Embedded:
    """Image features and caption features paired by image path: caption j belongs to the stored image its line
    names (IMAGE<TAB>CAPTION, kept by text_features_extraction.py --tsv as the column ``image_paths``)."""
    images, paths, image_config = _extracted(images_path, "paths", "image_features_extraction.py")
    captions, named, text_config = _extracted(captions_path, "image_paths", "text_features_extraction.py --tsv")
    if images.shape[1] != captions.shape[1]:
        raise UserError(f"{images_path} holds {images.shape[1]}-d and {captions_path} {captions.shape[1]}-d "
                        f"features: they come from different models")
    made_by = {image_config.get("checkpoint_sha256"), text_config.get("checkpoint_sha256")}
    if None not in made_by and len(made_by) > 1:
        raise UserError(f"{images_path} and {captions_path} were made by different checkpoints "
                        f"({image_config.get('checkpoint')}, {text_config.get('checkpoint')}): extract both with one")
    row = {path: index for index, path in enumerate(paths)}
    unknown = sorted({name for name in named if name not in row})
    if unknown:
        raise UserError(f"{captions_path}: {sum(name not in row for name in named)} captions name {len(unknown)} "
                        f"images not in {images_path} ({_examples(unknown)}); IMAGE must be a stored path, e.g. "
                        f"{paths[0]!r}" if paths else f"{images_path} holds no image")
    owner = np.array([row[name] for name in named], dtype=np.int64)
    lonely = [paths[index] for index in np.setdiff1d(np.arange(len(paths)), owner)]
    if lonely:
        raise UserError(f"{len(lonely)} of the {len(paths)} images of {images_path} have no caption in "
                        f"{captions_path} ({_examples(lonely)}); extract the images of the captions only (--list)")
    source = {"checkpoint": image_config.get("checkpoint"), "checkpoint_sha256": image_config.get("checkpoint_sha256"),
              "dataset": f"{images_path} + {captions_path}", "size": image_config.get("size"), "protocol": "resize"}
    return Embedded(images, captions, owner, source)


def embed_split(args: argparse.Namespace) -> Embedded:
    """Embed the split's images and captions with the checkpoint (the model, image and word libraries are
    imported here, only on this path)."""
    from misc.data.datasets import load_records, prepare_dataset
    from misc.eval.encode import encode_records
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    dataset = args.dataset or model.config["train"]["dataset"]
    prepare_dataset(dataset)
    records = load_records(dataset, args.split)
    size = args.size or (256 if args.protocol == "crop" else model.test_size)
    log.info("embedding %d images (%dx%d) and their captions from %s on %s", len(records), size, size, dataset,
             model.device)
    embedded = encode_records(model.model, records, model.words, model.device, size, batch_size=args.batch_size,
                              workers=args.workers if args.workers is not None else 2, amp=model.amp,
                              progress=not args.no_progress, protocol=args.protocol)
    images, captions, owner = (np.asarray(x) for x in embedded)
    return Embedded(images, captions, owner, {"checkpoint": args.checkpoint, "dataset": str(dataset),
                                              "split": args.split, "size": size, "protocol": args.protocol})


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
