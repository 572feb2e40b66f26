"""Search feature files made by image_features_extraction.py / text_features_extraction.py in the joint space.

    python search.py --images images.npz -p model.pth.tar -q "a dog playing with a frisbee" -k 10   # text -> images
    python search.py --images images.npz --texts captions.npz --image 12          # image (row or path) -> captions
    python search.py --images images.npz --image val2014/x.jpg                    # image -> images (itself excluded)
    python search.py --images photos.npz --image photos/cat.jpg                   # the same image, by its file
    python search.py --images images.npz -p model.pth.tar --image new_photo.jpg   # an image file not in the set
    python search.py --images big.npz -p model.pth.tar -q "a red bus" --index faiss --json -
    python search.py --images big.npz --build-index --max-index-memory 4G         # build, measure, report
    python search.py --images images.npz -p model.pth.tar -q "a red bus" --localize   # where the bus is
    python search.py --images images.npz -p model.pth.tar --serve --port 8000     # POST /search on 127.0.0.1

An --image that is a stored image of --images (a row number, its stored path, or the file itself as a path from
here, inside the extracted folder) uses its stored features; any other image file is embedded (needs -p).
The searched collection is --texts when given, else --images. Scores are cosine similarities (unit vectors).
--index exact (default) multiplies the query by every row, by blocks (the features are memory-mapped).
--index faiss (and --build-index) builds an index once and saves it with the features (FOLDER/index.faiss inside a
sharded folder, FEATURES.npz.faiss beside an .npz; a .faiss.json sidecar fingerprints the features: a stale index is
rebuilt), chosen from the collection's size and --max-index-memory (misc/collections/index.py): exact (Flat) below
100k vectors, HNSW below 1M, then IVF-flat, IVF-SQfp16, IVF-SQ8 and OPQ+IVF+PQ, the first that fits (--index-factory
names one). Every build writes FOLDER/index_report.json (FEATURES.npz.index_report.json): 10-recall@10 and
1-recall@1 against exact search on up to 1000 held-out rows (a row is not its own neighbour) and, with -p, on up to
1000 stored captions of an image folder as text queries; p50/p99 latency, bytes per vector and build time for each
nprobe (IVF) / efSearch (HNSW) tried; the default is the smallest reaching 10-recall@10 >= 0.95 for both (else one
line says so). --nprobe overrides it (efSearch for HNSW); --rerank R scores the index's top R again exactly.
--localize (text -> images) adds where the text is in each found image: the eq. 9 heatmap's peak and a box.
--serve answers POST /search (misc/collections/server.py) on --host (default 127.0.0.1) and --port.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from misc.cli import add_checkpoint_args, add_device_args, add_words_arg, parser_for, positive_int, run
from misc.errors import UserError
from misc.store.files import write_json
from misc.store.source import model_sha256

if TYPE_CHECKING:
    from misc.collections.search import Collection, Searcher
    from misc.inference import Inference

log = logging.getLogger("search")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("--images", type=Path, help="image features (.npz from image_features_extraction.py)")
    parser.add_argument("--texts", type=Path, help="text features (.npz from text_features_extraction.py)")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("-q", "--query", action="append", help="text query (repeat for several); needs -p")
    query.add_argument("--image", help="image query: a row number (digits) or stored path of --images, or an "
                                      "image file")
    query.add_argument("--build-index", action="store_true", help="build (again) the faiss index and its report")
    query.add_argument("--serve", action="store_true", help="serve POST /search over HTTP")
    add_checkpoint_args(parser, required=False)
    add_words_arg(parser)
    parser.add_argument("-k", type=positive_int, default=10, help="results per query (default: 10)")
    parser.add_argument("--index", choices=["exact", "faiss"], default="exact")
    parser.add_argument("--max-index-memory", help="memory budget of the index, e.g. 4G, 512M")
    parser.add_argument("--index-factory", help="a faiss index_factory string instead of the budget's choice")
    parser.add_argument("--nprobe", type=positive_int, help="IVF lists visited (HNSW: efSearch) per query "
                                                            "(default: the report's choice)")
    parser.add_argument("--rerank", type=positive_int, help="score the index's top R again exactly")
    parser.add_argument("--localize", action="store_true", help="text queries: where the text is in each image")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="--serve: port (default: 8000)")
    parser.add_argument("--json", help="write the results as JSON to this file ('-' for standard output)")
    add_device_args(parser, workers=False)
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace, why: str) -> Inference:
    if args.checkpoint is None:
        raise UserError(f"{why} needs the model: pass -p CHECKPOINT")
    from misc.inference import Inference

    return Inference.load(args.checkpoint, args.words, args.device, args.amp)


def image_query(args: argparse.Namespace, images: Collection | None) -> tuple[np.ndarray, str, int | None, str]:
    """Embedding (1, d) of --image, its label, its row in --images (None for an outside file) and the sha256 of the
    checkpoint that embedded it."""
    from misc.collections.search import stored_row

    if images is not None:
        row = stored_row(images, args.image)
        if row is not None:
            label = str(images.labels[row])
            return np.asarray(images.features[row:row + 1]), label, row, images.config.get("checkpoint_sha256", "")
    path = Path(args.image)
    if not path.is_file():
        where = f"a row or stored path of {images.path}, nor " if images is not None else ""
        raise UserError(f"--image {args.image}: not {where}an image file")
    from misc.collections.queries import image_embedding
    from misc.data.images import read_image

    model = load_model(args, "an image file query")
    size = (images.config.get("size") if images is not None else None) or model.test_size
    return image_embedding(model, read_image(path, size), size), str(path), None, model_sha256(args.checkpoint)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.texts is None and args.images is None:
        raise UserError("pass the features to search: --images and/or --texts")
    if not (args.query or args.image or args.build_index or args.serve):
        raise UserError("say what to do: -q TEXT, --image IMAGE, --build-index or --serve")
    from misc.collections.index import parse_bytes
    from misc.collections.queries import caption_queries, localize, text_embeddings
    from misc.collections.search import Searcher, load_collection, print_results, result_entry

    images = load_collection(args.images) if args.images else None
    collection = load_collection(args.texts) if args.texts else images
    if images is not None and images.kind != "image":
        raise UserError(f"--images {args.images} holds text features")
    if collection.kind != ("text" if args.texts else "image"):
        raise UserError(f"--texts {args.texts} holds image features")
    try:
        budget = parse_bytes(args.max_index_memory) if args.max_index_memory else None
    except ValueError as error:
        raise UserError(f"--max-index-memory {error}") from error
    method = "faiss" if args.build_index or args.index_factory or budget else args.index
    searcher = Searcher(collection, method, budget, args.index_factory, args.nprobe, args.rerank)
    if args.build_index:
        searcher.text_queries = partial(caption_queries, args.checkpoint and load_model(args, "-p"), collection)
        return build(searcher)
    if args.serve:
        from misc.collections.server import make_app, make_server

        model = load_model(args, "--serve") if args.checkpoint else None
        searcher.text_queries = partial(caption_queries, model, collection)
        searcher.prepare()
        log.info("serving %s (%d rows) on http://%s:%d", collection.path, len(collection.features), args.host,
                 args.port)
        return make_server(make_app(searcher, model), args.host, args.port).run()
    exclude, model = None, None
    if args.query:
        model = load_model(args, "a text query")
        searcher.text_queries = partial(caption_queries, model, collection)
        queries, labels, made_by = text_embeddings(model, args.query), list(args.query), model_sha256(args.checkpoint)
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
    if args.localize and (model is None or collection.kind != "image"):
        raise UserError("--localize needs -q text queries searched in --images (and -p)")
    scores, rows, info = searcher.search(queries, args.k + (exclude is not None))
    results = []
    for label, query_scores, query_rows in zip(labels, scores, rows):
        kept = [(s, int(r)) for s, r in zip(query_scores, query_rows) if r >= 0 and r != exclude][:args.k]
        entries = [result_entry(collection, rank, s, r) for rank, (s, r) in enumerate(kept, 1)]
        if args.localize:
            for entry, place in zip(entries, localize(model, collection, [r for _, r in kept], label)):
                entry["localization"] = place
        results.append({"query": label, "type": query_type, "results": entries})
    print_results(collection, results, info, sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        output = {"collection": str(collection.path), "kind": collection.kind, "size": len(collection.features),
                  "index": info, "queries": results}
        if args.json == "-":
            json.dump(output, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            write_json(args.json, output)


def build(searcher: Searcher) -> None:
    """--build-index: build the index again and print its report's summary."""
    from misc.collections.index import index_files, load_or_build_index

    load_or_build_index(searcher.collection, searcher.budget, searcher.factory, searcher.rerank, rebuild=True,
                        text_queries=searcher.text_queries)
    path = index_files(searcher.collection.path)[2]
    record = json.loads(path.read_text(encoding="utf-8"))
    print(f'{record["factory"]}: {record["count"]} vectors, {record["bytes_per_vector"]} bytes each, built in '
          f'{record["build_s"]} s; {record["queries"]} held-out rows, {record["text_queries"]} caption queries; '
          f'report in {path}')
    for row in record["sweep"]:
        print("  " + "  ".join(f"{key} {value}" for key, value in row.items()))
    print(f'default {record["default"] or "exact"}' + (f'; {record["note"]}' if record["note"] else ""))


if __name__ == "__main__":
    run(main)
