"""Export a checkpoint for inference: a folder with its weights (safetensors), its configuration (config.json), the
word vectors it was trained with (words.safetensors + vocab.txt) and a model card (README.md); no optimizer state.
Every command's -p, Inference.load and hubconf take the folder as they take a checkpoint.

    python export.py -p runs/demo/best.pth.tar -o exports/demo
    python export.py -p runs/paper/best.pth.tar -o exports/paper --words-ref   # words by file name and sha256 only
    python checkpoint.py inspect exports/demo
"""
from __future__ import annotations

import argparse
from pathlib import Path

from misc.cli import add_checkpoint_args, add_words_arg, parser_for, run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_checkpoint_args(parser)
    add_words_arg(parser)
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="export folder (written whole, then renamed; replaces an earlier export there)")
    parser.add_argument("--words-ref", action="store_true",
                        help="store only the word-vector file's name and sha256, not the vectors (for large tables "
                             "every user already has); loading then needs the file under the data root or --words")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from misc.store.checkpoint import export_file  # torch loads only now: --help stays fast

    written = export_file(args.checkpoint, args.out, args.words, args.words_ref)
    size = sum(path.stat().st_size for path in written)
    source = [args.checkpoint] if args.checkpoint.is_file() else list(args.checkpoint.iterdir())
    print(f"{args.checkpoint} -> {args.out}: {', '.join(path.name for path in written)} ({size / 1e6:.1f} MB; "
          f"the source: {sum(path.stat().st_size for path in source) / 1e6:.1f} MB)")


if __name__ == "__main__":
    run(main)
