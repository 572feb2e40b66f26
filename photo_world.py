"""Write the real-photo world (misc/data/photos.py): objects cut out of the photos scikit-image ships (nothing is
downloaded) pasted at random places and scales onto crops of its texture photos, each image with five honest
captions, its objects' phrases and boxes, and their masks and the background's, in one JSON-lines file that every
command takes as --dataset (data/README.md).

    python photo_world.py data/photos                                   # the world the `photos` preset trains on
    python photo_world.py data/photos --train 1200 --val 50 --test 500
    python photo_world.py /tmp/small --seed 1 --size 96 --train 40 --val 8 --test 8

Writes OUT/images/<split>/<index>.jpg, OUT/photos.jsonl and, last, the manifest OUT/photos.json. The world depends
on the seed, the counts and the size only; OUT must be empty or missing, or already hold this very world.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from misc.cli import parser_for, positive_int, run
from misc.data.photos import COUNTS, SIZE, generate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("out", type=Path, help="folder to write (empty or missing)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    parser.add_argument("--size", type=positive_int, default=SIZE, help=f"image side in pixels (default {SIZE})")
    for split, count in COUNTS.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"{split} images (default {count})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = {split: getattr(args, split) for split in COUNTS}
    print(f"{generate(args.out, args.seed, counts, args.size)}: {sum(counts.values())} images "
          f"({', '.join(f'{count} {split}' for split, count in counts.items())})")


if __name__ == "__main__":
    run(main)
