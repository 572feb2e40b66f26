"""Say what a checkpoint file holds, or convert the original release's model.pth.tar to this project's checkpoint
format (plain data, loads with torch.load(..., weights_only=True); misc/store/checkpoint.py).

    python checkpoint.py inspect runs/demo/best.pth.tar                 # this project's checkpoint
    python checkpoint.py inspect exports/demo                           # an export folder (export.py)
    python checkpoint.py inspect model.pth.tar                          # the original release's joint model
    python checkpoint.py convert model.pth.tar runs/paper/model.pth.tar # write its conversion, checked to load first

Every command already takes the original model.pth.tar as it is (converted in memory); convert keeps a converted copy.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from misc.cli import parser_for, run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write an original model.pth.tar in this project's format")
    convert.add_argument("source", type=Path, help="the original release's model.pth.tar")
    convert.add_argument("out", type=Path, help="checkpoint to write (written when complete)")
    inspect = commands.add_parser("inspect", help="say what a checkpoint file or an export folder holds")
    inspect.add_argument("file", type=Path, help="any checkpoint file or export folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from misc.store.checkpoint import convert_file, describe  # torch loads only now: --help stays fast

    print(convert_file(args.source, args.out) if args.command == "convert" else describe(args.file))


if __name__ == "__main__":
    run(main)
