"""What every command-line script shares: its common arguments (defined once here), checked numbers, logging, and
one-line errors. Library code never imports this module."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn
from collections.abc import Callable

from misc.config import CLONE, ROOT
from misc.errors import UserError


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with the house's error format: one line ``error: ...`` on standard error, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser_for(doc: str | None) -> Parser:
    """The parser of a CLI: its module docstring as the description, kept as written."""
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_checkpoint_args(parser: argparse.ArgumentParser | Any, required: bool = True) -> None:
    """``-p/--checkpoint``: a model source (:mod:`misc.store.source`), a checkpoint file or an export folder.
    ``parser`` may be a mutually exclusive group for the checkpoint."""
    parser.add_argument("-p", "--checkpoint", type=Path, required=required,
                        help="model: a checkpoint (this project's, or the original release's model.pth.tar) or an "
                             "export folder (export.py)")


def add_extraction_args(parser: argparse.ArgumentParser, source: str, source_help: str, batch_size: int) -> None:
    """What both extraction CLIs take: the checkpoint, ``-d`` the data (``args.<source>``), ``-o`` the output and
    the batch size."""
    add_checkpoint_args(parser)
    parser.add_argument("-d", f"--{source}", type=Path, required=True, help=source_help)
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output .npz (written when complete), or a folder (any other name): the sharded layout")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"items per batch (default {batch_size})")


def add_words_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--words", type=Path, help="word-vector file (default: the checkpoint's)")


class TorchThreads(argparse.Action):
    """``--threads N``: ``torch.set_num_threads(N)`` as the flag is read, so that every command honours it (torch
    is imported only then)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        import torch

        torch.set_num_threads(values)
        setattr(namespace, self.dest, values)


def add_device_args(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """The flags of every command that runs a model, in one group of its ``--help``: ``--device``, ``--amp``,
    ``--threads``, ``--no-progress`` and, where data is loaded in batches (``workers``), ``--workers``."""
    group = parser.add_argument_group("running the model")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    group.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                       help="mixed precision (bare --amp means bf16): bf16 on CUDA or the CPU (autocast, "
                            "channels-last; embeddings change slightly), fp16 on CUDA only")
    group.add_argument("--threads", type=positive_int, action=TorchThreads,
                       help="CPU threads for torch (default: torch's choice, one per core)")
    if workers:
        group.add_argument("--workers", type=int, default=None, help="data-loading processes")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_size_arg(parser: argparse.ArgumentParser, default: int | None = None,
                 default_text: str = "the checkpoint's test_size") -> None:
    parser.add_argument("--size", type=positive_int, default=default,
                        help=f"resize images to SIZE x SIZE (default: {default or default_text})")


def add_output_args(parser: argparse.ArgumentParser, results_key: str) -> None:
    """An evaluator's ``--json PATH`` (its results record of docs/results.md, with its rows), ``--results PATH``
    (the same record set in a shared results file) under ``--results-key`` (default ``results_key``)."""
    parser.add_argument("--json", type=Path, help="write the results record (docs/results.md) and its rows here")
    parser.add_argument("--results", type=Path,
                        help="set the results record in this shared JSON file, under --results-key (dotted keys nest)")
    parser.add_argument("--results-key", default=results_key,
                        help=f"entry of --results to write (default {results_key})")


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. model.pooling=gap or train.lr=5e-4 (repeatable)")


def run(main: Callable[..., Any], argv: list[str] | None = None) -> None:
    """Run a CLI's ``main(argv)``; user mistakes print one line ``error: ...`` and exit with status 2."""
    if CLONE:  # sru compiles its kernels once into the clone (as `make` does); installed, into torch's default
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for library in ("gensim", "faiss"):  # their INFO lines (gensim's progress, faiss's CPU probing) are not ours
        logging.getLogger(library).setLevel(logging.WARNING)
    try:
        main() if argv is None else main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
