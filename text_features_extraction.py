"""Embed every line of a text file into the joint space (paper eq. 4): one unit vector per caption.

    python text_features_extraction.py -p runs/demo/best.pth.tar -d captions.txt -o captions.npz
    python text_features_extraction.py -p model.pth.tar -d pairs.tsv --tsv -o captions.npz   # IMAGE<TAB>CAPTION
    python text_features_extraction.py -p model.pth.tar -d captions.jsonl -o captions/       # the sharded layout
    torchrun --nproc_per_node=4 text_features_extraction.py -p model.pth.tar -d captions.txt -o captions/

Empty lines, lines with no word and lines that are not valid UTF-8 are skipped and reported with their line
numbers; out-of-vocabulary words are counted (they map to the UNK vector). Lines are embedded in batches of lines
of similar length (at most --batch-size lines and --max-tokens padded tokens), so memory follows the batch: a
very long line is embedded on its own.

--tsv: every line is IMAGE<TAB>CAPTION (split at the first tab; a line without one is skipped). A .jsonl file:
every line is an object with 'caption' and an optional 'path' (image_features_extraction.py --list's rows). The
caption is embedded and the image kept beside it: the path of the caption's image as image_features_extraction.py
stores it, relative to its folder.

-o X.npz (small jobs): features (M, d) float32 unit rows; the embedded lines, verbatim, as lines_utf8 (their UTF-8
bytes one after the other) and lines_offsets (M + 1,): line i is lines_utf8[offsets[i]:offsets[i + 1]]
(misc.store.arrays.TextColumn reads them); line_numbers (M,) 1-based; oov (M,) unknown words per line; skipped (K, 2)
line number and reason; config, a JSON string; when every embedded line names its image, the text column
image_paths (image_paths_utf8, image_paths_offsets): eval_retrieval.py --features IMAGES.npz --text-features
CAPTIONS.npz pairs the two by it.

-o FOLDER (any name not ending in .npz): the sharded layout of misc/collections/shards.py, a shard being
--chunk-size lines of the file: manifest.json, emb/txt/NNNNNN.npy (--dtype, float16 by default),
meta/NNNNNN.parquet (key: the image, else the line number; source FILE:LINE; caption: the line; line) and
done/NNNNNN.json per shard. Running the same command again continues: only shards without a valid done record are
computed; a different checkpoint, word vectors, dtype or file content is refused. Under torchrun each rank takes
the shards n with n % WORLD_SIZE == RANK, and the vectors are those of one process.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from misc.cli import add_device_args, add_extraction_args, add_words_arg, parser_for, positive_int, run
from misc.errors import UserError

if TYPE_CHECKING:
    from misc.collections.texts import TextLines

log = logging.getLogger("text_features_extraction")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_extraction_args(parser, "data", "text file, one caption a line (or .jsonl)", batch_size=256)
    parser.add_argument("--max-tokens", type=positive_int,
                        help="padded tokens per batch, lines x longest (default: MAX_TOKENS of misc/data/words.py)")
    parser.add_argument("--tsv", action="store_true", help="lines are IMAGE<TAB>CAPTION (see above)")
    parser.add_argument("--chunk-size", type=positive_int, default=100_000,
                        help="lines of the file per shard (folder output) (default: 100000)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="vectors of the sharded layout (default: float16)")
    add_words_arg(parser)
    add_device_args(parser)
    return parser.parse_args(argv)


def read_input(args: argparse.Namespace) -> tuple[TextLines, dict[int, str]]:
    """The captions to embed and, by line number, the image each names (--tsv, .jsonl)."""
    from misc.collections.texts import read_text_lines, split_jsonl, split_tsv

    text = read_text_lines(args.data)
    if args.tsv:
        return split_tsv(text)
    return split_jsonl(text) if args.data.suffix.lower() == ".jsonl" else (text, {})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from misc.collections.shards import is_sharded

    text, images = read_input(args)
    if not text.lines:
        raise UserError(f"{args.data}: no line to embed" + (" (--tsv: lines are IMAGE<TAB>CAPTION)" * args.tsv))
    if is_sharded(args.out):
        return extract_sharded(args, text, images)
    from misc.store.arrays import skipped_array, text_column, write_npz
    from misc.collections.extraction import describe_checkpoint, log_skipped
    from misc.inference import Inference
    from misc.collections.texts import embed_lines
    from misc.data.words import MAX_TOKENS

    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    text, features, oov, tokens = embed_lines(model.model, model.words, text, model.device, args.batch_size,
                                              model.amp, not args.no_progress, args.max_tokens or MAX_TOKENS)
    if not text.lines:
        raise UserError(f"{args.data}: no line with a word in the vocabulary to embed")
    log_skipped([(f"{args.data}:{number}", reason) for number, reason in text.skipped], args.out)
    record = describe_checkpoint(args.checkpoint, model.state, word_vectors=str(model.words.source),
                                 data=str(args.data))
    paired = bool(images) and all(number in images for number in text.numbers)
    write_npz(args.out, {"features": features, **text_column(text.lines, "lines"),
                         "line_numbers": np.array(text.numbers, dtype=np.int64), "oov": oov,
                         "skipped": skipped_array([(str(number), reason) for number, reason in text.skipped]),
                         "config": np.array(json.dumps(record)),
                         **(text_column([images[n] for n in text.numbers], "image_paths") if paired else {})})
    log.info("%d lines embedded, %d skipped; out-of-vocabulary words: %d of %d (%.1f%%), lines with any: %d -> %s",
             len(text.lines), len(text.skipped), oov.sum(), tokens.sum(), 100 * oov.sum() / max(tokens.sum(), 1),
             int((oov > 0).sum()), args.out)


def extract_sharded(args: argparse.Namespace, text: TextLines, images: dict[int, str]) -> None:
    """The sharded layout: this rank's shards not done yet, into the folder -o."""
    from misc.collections.extraction import describe_checkpoint, log_skipped
    from misc.collections.shard_run import rank_and_world, rank_device, run_manifest
    from misc.collections.shards import ShardFolder
    from misc.collections.texts import extract_text_shards, text_shards
    from misc.data.words import MAX_TOKENS
    from misc.inference import Inference

    rank, world = rank_and_world()
    shards = text_shards(text, images, args.chunk_size)
    model = Inference.load(args.checkpoint, args.words, rank_device(args.device), args.amp)
    source = str(args.data.resolve())
    record = describe_checkpoint(args.checkpoint, model.state, word_vectors=str(model.words.source), data=source)
    protocol = "tsv" if args.tsv else "jsonl" if args.data.suffix.lower() == ".jsonl" else "lines"
    manifest = run_manifest(source, shards, record, model.model.vector_dim, args.dtype, "text", protocol)
    store = ShardFolder(args.out, "text")
    store.open(manifest, rank, world)
    try:
        log.info("rank %d of %d: %d shards of %d lines from %s on %s", rank, world, len(shards), args.chunk_size,
                 args.data, model.device)
        run, counts = extract_text_shards(model.model, model.words, shards, str(args.data), store, dtype=args.dtype,
                                          device=model.device, batch_size=args.batch_size, amp=model.amp,
                                          max_tokens=args.max_tokens or MAX_TOKENS, rank=rank, world=world,
                                          progress=not args.no_progress)
    finally:
        store.close()
    log_skipped(run.skipped, args.out / "done", listed="'skipped_samples' of the done records in")
    log.info("rank %d: %d shards (%d already done), %d lines embedded, %d skipped; out-of-vocabulary words: %d of %d, "
             "lines with any: %d -> %s", rank, run.shards, run.resumed, run.rows, len(run.skipped), counts.oov,
             counts.tokens, counts.lines_with_oov, args.out)


if __name__ == "__main__":
    run(main)
