"""Search feature files made by image_features_extraction.py / text_features_extraction.py in the joint space.

    python search.py --images images.npz -p model.pth.tar -q "a dog playing with a frisbee" -k 10   # text -> images
    python search.py --images images.npz --texts captions.npz --image 12          # image (row or path) -> captions
    python search.py --images images.npz --image val2014/x.jpg                    # image -> images (itself excluded)
    python search.py --images photos.npz --image photos/cat.jpg                   # the same image, by its file
    python search.py --images images.npz -p model.pth.tar --image new_photo.jpg   # an image file not in the set
    python search.py --images big.npz -p model.pth.tar -q "a red bus" --index faiss --json -

An --image that is a stored image of --images (a row number, its stored path, or the file itself as a path from
here, inside the extracted folder) uses its stored features; any other image file is embedded (needs -p).
The searched collection is --texts when given, else --images. Scores are cosine similarities (unit vectors).
--index exact (default) multiplies the query by every row, by blocks (the features are memory-mapped).
--index faiss builds an index once and saves it next to the features (FEATURES.npz.faiss, with a fingerprint of
the features in FEATURES.npz.faiss.json; a stale index is rebuilt): exact (flat) below 100k rows, else IVF-flat
with sqrt(N) lists, of which --nprobe are visited per query (default nlist/16, at least 8). More lists visited:
higher recall, slower queries; nprobe = nlist is exact. bench/bench_search.py measures the trade-off.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from misc.cli import add_checkpoint_args, add_device_args, add_words_arg, parser_for, positive_int, run
from misc.errors import UserError
from misc.store.files import write_json
from misc.store.source import model_sha256

if TYPE_CHECKING:
    from misc.inference import Inference
    from misc.collections.search import Collection

log = logging.getLogger("search")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("--images", type=Path, help="image features (.npz from image_features_extraction.py)")
    parser.add_argument("--texts", type=Path, help="text features (.npz from text_features_extraction.py)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("-q", "--query", action="append", help="text query (repeat for several); needs -p")
    query.add_argument("--image", help="image query: a row number (digits) or stored path of --images, or an "
                                      "image file")
    add_checkpoint_args(parser, required=False)
    add_words_arg(parser)
    parser.add_argument("-k", type=positive_int, default=10, help="results per query (default: 10)")
    parser.add_argument("--index", choices=["exact", "faiss"], default="exact")
    parser.add_argument("--nprobe", type=positive_int,
                        help="faiss IVF lists visited per query (default: nlist/16, >= 8)")
    parser.add_argument("--json", help="write the results as JSON to this file ('-' for standard output)")
    add_device_args(parser, workers=False)
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace, why: str) -> Inference:
    if args.checkpoint is None:
        raise UserError(f"{why} needs the model: pass -p CHECKPOINT")
    from misc.inference import Inference

    return Inference.load(args.checkpoint, args.words, args.device, args.amp)


def text_queries(args: argparse.Namespace) -> tuple[np.ndarray, list[str], str]:
    """Embeddings (Q, d) of the -q texts, their labels and the sha256 of the checkpoint that embedded them."""
    from misc.collections.texts import count_oov

    model = load_model(args, "a text query")
    oov, tokens = count_oov(model.words, args.query)
    for text, count in zip(args.query, tokens):
        if not count:
            raise UserError(f"query {text!r} has no words")
    if oov.sum():
        log.warning("%d of %d query words are not in the vocabulary (mapped to UNK)", oov.sum(), tokens.sum())
    features = model.embed_texts(args.query).numpy()
    for text, norm in zip(args.query, np.linalg.norm(features, axis=1)):
        if norm < 0.5:
            raise UserError(f"query {text!r}: none of its words is in the vocabulary of {model.words.source}")
    return features, list(args.query), model_sha256(args.checkpoint)


def image_query(args: argparse.Namespace, images: Collection | None) -> tuple[np.ndarray, str, int | None, str]:
    """Embedding (1, d) of --image, its label, its row in --images (None for an outside file) and the sha256 of the
    checkpoint that embedded it."""
    if images is not None:
        row = stored_row(images, args.image)
        if row is not None:
            label = str(images.labels[row])
            return np.asarray(images.features[row:row + 1]), label, row, images.config.get("checkpoint_sha256", "")
    path = Path(args.image)
    if not path.is_file():
        where = f"a row or stored path of {images.path}, nor " if images is not None else ""
        raise UserError(f"--image {args.image}: not {where}an image file")
    from misc.data.images import read_image

    model = load_model(args, "an image file query")
    size = (images.config.get("size") if images is not None else None) or model.test_size
    features = model.embed_images(model.transform(size)(read_image(path, size))[None]).numpy()
    return features, str(path), None, model_sha256(args.checkpoint)


def stored_row(images: Collection, query: str) -> int | None:
    """The row of --images that ``query`` names: a row number, a stored path (relative to the extracted folder), or
    a path from here to a file of the extracted folder (``photos/cat.jpg`` for the stored ``cat.jpg``); None if
    it names none of them."""
    if query.isdigit():
        if int(query) >= len(images.features):
            raise UserError(f"--image {query}: {images.path} has rows 0 to {len(images.features) - 1}")
        return int(query)
    names = [query]
    folder = images.config.get("folder")
    if folder and Path(query).exists() and Path(query).resolve().is_relative_to(Path(folder)):
        names.append(Path(query).resolve().relative_to(Path(folder)).as_posix())
    for name in names:
        found = np.flatnonzero(images.labels == name)
        if len(found):
            return int(found[0])
    return None


def search(collection: Collection, queries: np.ndarray, k: int, method: str,
           nprobe: int | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Scores and rows (Q, k') best first (-1 rows: not found by an approximate index), and how they were found."""
    from misc.collections.search import exact_search, index_search, load_or_build_index

    if method == "exact":
        scores, rows = exact_search(queries, collection.features, k)
        return scores, rows, {"type": "exact"}
    index, built = load_or_build_index(collection)
    scores, rows = index_search(index, queries, k, nprobe)
    info = {"type": f"faiss {type(index).__name__}", "built": built}
    if hasattr(index, "nprobe"):
        info.update(nlist=index.nlist, nprobe=index.nprobe)
    return scores, rows, info


def result_entry(collection: Collection, rank: int, score: float, row: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"rank": rank, "score": round(float(score), 6), "row": row}
    if collection.kind == "image":
        entry["path"] = str(collection.labels[row])
    else:
        entry["line_number"] = int(collection.line_numbers[row])
        entry["line"] = str(collection.labels[row])
    return entry


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.texts is None and args.images is None:
        raise UserError("pass the features to search: --images and/or --texts")
    from misc.collections.search import load_collection

    images = load_collection(args.images) if args.images else None
    collection = load_collection(args.texts) if args.texts else images
    if images is not None and images.kind != "image":
        raise UserError(f"--images {args.images} holds text features")
    if collection.kind != ("text" if args.texts else "image"):
        raise UserError(f"--texts {args.texts} holds image features")
    exclude = None
    if args.query:
        queries, labels, made_by = text_queries(args)
        query_type = "text"
    else:
        queries, label, exclude, made_by = image_query(args, images)
        labels, query_type = [label], "image"
        exclude = exclude if collection is images else None  # an image is not its own neighbour
    if queries.shape[1] != collection.features.shape[1]:
        raise UserError(f"queries are {queries.shape[1]}-d but {collection.path} holds "
                          f"{collection.features.shape[1]}-d features: they come from different models")
    if made_by and collection.config.get("checkpoint_sha256", made_by) != made_by:
        log.warning("%s was made with another checkpoint than the query: the scores compare different spaces",
                    collection.path)
    scores, rows, info = search(collection, queries, args.k + (exclude is not None), args.index, args.nprobe)
    results = []
    for label, query_scores, query_rows in zip(labels, scores, rows):
        kept = [(s, int(r)) for s, r in zip(query_scores, query_rows) if r >= 0 and r != exclude][:args.k]
        results.append({"query": label, "type": query_type,
                        "results": [result_entry(collection, rank, s, r) for rank, (s, r) in enumerate(kept, 1)]})
    report(collection, results, info, sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        output = {"collection": str(collection.path), "kind": collection.kind, "size": len(collection.features),
                  "index": info, "queries": results}
        if args.json == "-":
            json.dump(output, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            write_json(args.json, output)


def report(collection: Collection, results: list[dict[str, Any]], info: dict[str, Any], stream: TextIO) -> None:
    """Human summary: the ranked results of every query."""
    nouns = "images" if collection.kind == "image" else "lines"
    for result in results:
        print(f'{result["type"]} {result["query"]!r} -> top {len(result["results"])} of {len(collection.features)} '
              f'{nouns} ({info["type"]}):', file=stream)
        for entry in result["results"]:
            what = entry["path"] if collection.kind == "image" else f'line {entry["line_number"]}: {entry["line"]}'
            print(f'{entry["rank"]:4d}  {entry["score"]:.4f}  {what}', file=stream)


if __name__ == "__main__":
    run(main)
