"""Embed every line of a text file into the joint space (paper eq. 4): one unit vector per caption.

    python text_features_extraction.py -p runs/demo/best.pth.tar -d captions.txt -o captions.npz
    python text_features_extraction.py -p model.pth.tar -d pairs.tsv --tsv -o captions.npz   # IMAGE<TAB>CAPTION

Empty lines, lines with no word and lines that are not valid UTF-8 are skipped and reported with their line
numbers; out-of-vocabulary words are counted (they map to the UNK vector). Lines are embedded in batches of lines
of similar length (at most --batch-size lines and --max-tokens padded tokens), so memory follows the batch: a
very long line is embedded on its own.

Output (.npz): features (M, d) float32 unit rows; the embedded lines, verbatim, as lines_utf8 (their UTF-8 bytes
one after the other) and lines_offsets (M + 1,): line i is lines_utf8[offsets[i]:offsets[i + 1]]
(misc.store.arrays.TextColumn reads them); line_numbers (M,) 1-based; oov (M,) unknown words per line; skipped (K, 2)
line number and reason; config, a JSON string.

--tsv: every line is IMAGE<TAB>CAPTION (split at the first tab; a line without one is skipped). The caption is
embedded and IMAGE kept beside it as the text column image_paths (image_paths_utf8, image_paths_offsets): the path
of the caption's image as image_features_extraction.py stores it, relative to its folder. eval_retrieval.py
--features IMAGES.npz --text-features CAPTIONS.npz pairs the two by it.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    add_extraction_args(parser, "data", "text file, one caption a line", batch_size=256)
    parser.add_argument("--max-tokens", type=positive_int,
                        help="padded tokens per batch, lines x longest (default: MAX_TOKENS of misc/data/words.py)")
    parser.add_argument("--tsv", action="store_true", help="lines are IMAGE<TAB>CAPTION (see above)")
    add_words_arg(parser)
    add_device_args(parser)
    return parser.parse_args(argv)


def split_images(text: TextLines) -> tuple[TextLines, dict[int, str]]:
    """--tsv: the captions of IMAGE<TAB>CAPTION lines and the image of each, by line number; lines without a tab,
    or with an empty image or caption, are skipped with the reason."""
    captions, numbers, images, skipped = [], [], {}, list(text.skipped)
    for line, number in zip(text.lines, text.numbers):
        image, tab, caption = line.partition("\t")
        if not tab or not image or not caption.strip():
            skipped.append((number, "not IMAGE<TAB>CAPTION" if not tab else "no image" if not image else "no caption"))
            continue
        captions.append(caption)
        numbers.append(number)
        images[number] = image
    return dataclasses.replace(text, lines=captions, numbers=numbers, skipped=sorted(skipped)), images


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from misc.store.arrays import skipped_array, text_column, write_npz
    from misc.collections.extraction import describe_checkpoint, log_skipped
    from misc.inference import Inference
    from misc.collections.texts import embed_lines, read_text_lines
    from misc.data.words import MAX_TOKENS

    text = read_text_lines(args.data)
    images: dict[int, str] = {}
    if args.tsv:
        text, images = split_images(text)
    if not text.lines:
        raise UserError(f"{args.data}: no line to embed" + (" (--tsv: lines are IMAGE<TAB>CAPTION)" * args.tsv))
    model = Inference.load(args.checkpoint, args.words, args.device, args.amp)
    text, features, oov, tokens = embed_lines(model.model, model.words, text, model.device, args.batch_size,
                                              model.amp, not args.no_progress, args.max_tokens or MAX_TOKENS)
    if not text.lines:
        raise UserError(f"{args.data}: no line with a word in the vocabulary to embed")
    log_skipped([(f"{args.data}:{number}", reason) for number, reason in text.skipped], args.out)
    record = describe_checkpoint(args.checkpoint, model.state, word_vectors=str(model.words.source),
                                 data=str(args.data))
    write_npz(args.out, {"features": features, **text_column(text.lines, "lines"),
                         "line_numbers": np.array(text.numbers, dtype=np.int64), "oov": oov,
                         "skipped": skipped_array([(str(number), reason) for number, reason in text.skipped]),
                         "config": np.array(json.dumps(record)),
                         **(text_column([images[n] for n in text.numbers], "image_paths") if args.tsv else {})})
    log.info("%d lines embedded, %d skipped; out-of-vocabulary words: %d of %d (%.1f%%), lines with any: %d -> %s",
             len(text.lines), len(text.skipped), oov.sum(), tokens.sum(), 100 * oov.sum() / max(tokens.sum(), 1),
             int((oov > 0).sum()), args.out)


if __name__ == "__main__":
    run(main)
