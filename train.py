"""Train DSVE-Loc (paper §4.1): staged Adam training with the hard-negative triplet loss; or the matchmap system
of Das et al. 2019 (model.arch=matchmap: presets das2019, das2019-code, demo-matchmap), N-pair loss and SGD.

    python train.py                      # COCO when configured in misc/config.py, else the built-in demo world
    python train.py --preset demo        # small model on the demo world, minutes on 2 CPU cores
    python train.py --preset demo-matchmap   # the matchmap system on the demo world, minutes on 2 CPU cores
    python train.py --preset das2019 --weights IMAGENET1K_V1   # Das et al. 2019 (words: config key glove_vectors)
    python train.py --resume runs/paper/last.pth.tar
    python train.py --dataset mine.jsonl --split train --val-split val --words glove-6b-50d --set model.word_dim=50 \
        --weights IMAGENET1K_V1   # one's own data (data/README.md)
    python train.py --preset paper --init pretrained_classif_152_2400.pth.tar   # the original release's start
    python train.py --preset paper --weights IMAGENET1K_V1   # torchvision's ImageNet trunk, from torch hub's cache
    torchrun --nproc_per_node=4 train.py --preset paper --init ...   # one process per GPU; global --batch-size
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from misc import config, presets
from misc.cli import add_device_args, add_set_arg, parser_for, positive_int, run
from misc.config import TrainConfig
from misc.errors import UserError, check_choice
from models.config import ModelConfig

if TYPE_CHECKING:
    from misc.train.state import Resume

log = logging.getLogger("train")
CONFIGURED = Path("<config key resnet_weights>")  # --resnet-weights without a file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("--preset", choices=list(presets.PRESETS), default=None,
                        help="paper (default when COCO is configured; the original code's schedule), paper-text "
                             "(the paper's text), demo, das2019 / das2019-code (Das et al.), demo-matchmap")
    add_set_arg(parser)
    parser.add_argument("--dataset", action="append",
                        help="coco | flickr30k | flickr30k_entities | demo | a JSON-lines file; repeated: several, "
                             "each one's --split concatenated, validated on the first one's --val-split")
    parser.add_argument("--split", help="training split (default: config train.split; any name of a JSON-lines file)")
    parser.add_argument("--val-split", help="validation split (default: config train.val_split)")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--limit", type=positive_int, help="train on the first N images of each dataset (smoke)")
    parser.add_argument("--words", type=Path, help="word-vector file (default: config key word_vectors; "
                                                   "glove_vectors for model.arch=matchmap; the demo world's on it)")
    parser.add_argument("--resume", type=Path,
                        help="continue a run from its last.pth.tar, in that file's folder unless --out says otherwise")
    parser.add_argument("--allow-changes", action="store_true", help="with --resume: keep changed settings (recorded)")
    parser.add_argument("--save-every", type=positive_int, metavar="N",
                        help="also write last.pth.tar every N steps within an epoch (resumed exactly from there); "
                             "SIGTERM and SIGUSR1 always write it at the next step, then stop")
    start = parser.add_argument_group("what a new run starts from (the paper preset needs one)")
    trunk = start.add_mutually_exclusive_group()
    trunk.add_argument("--init", type=Path, metavar="CKPT",
                       help="the original classification network (pretrained_classif_152_2400.pth.tar: trunk and "
                            "1x1 conv) or an original model.pth.tar (both DSVE only), or a checkpoint (every weight)")
    trunk.add_argument("--resnet-weights", nargs="?", const=CONFIGURED, type=Path, metavar="FILE",
                       help="a torchvision state dict of the trunk (default: config key resnet_weights)")
    trunk.add_argument("--weights", metavar="NAME",
                       help="torchvision's ImageNet weights of the trunk (IMAGENET1K_V1 or IMAGENET1K_V2), from "
                            "torch hub's cache (never downloaded)")
    trunk.add_argument("--from-scratch", action="store_true", help="a randomly initialised trunk")
    parser.add_argument("--out", type=Path, help="run folder (default: the resumed run's, else runs/<preset>, "
                                                 "which must not hold another run)")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="after training, export the best checkpoint to DIR: weights (safetensors), config, word "
                             "vectors and a model card (python export.py does it for any checkpoint)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for the trunk")
    add_device_args(parser)
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, Path | str | None, Resume | None]:
    """Model and training config: the resumed run's, else preset + flags (the demo world when COCO is not
    configured); the word-vector file, and the checkpoint to resume."""
    from misc.store import checkpoint, word_refs
    from misc.train.state import Resume, check_resume
    from models.trunks import IMAGENET_WEIGHTS

    if args.weights:
        check_choice("--weights", args.weights, IMAGENET_WEIGHTS)
    source = trunk_source(args)
    if args.resume and source:
        raise UserError("--init, --resnet-weights, --weights and --from-scratch start a new run; --resume "
                          "continues from the run's own weights")
    resumed = Resume(args.resume, checkpoint.load(args.resume)) if args.resume else None
    if resumed is not None:
        saved = resumed.state["config"]
        with checkpoint.naming(args.resume):
            model_cfg = config.from_dict(ModelConfig, saved["model"])
            train_cfg = config.from_dict(TrainConfig, saved.get("train", {}))
        if args.preset:  # compared with the run's own settings below, as --set is
            model_cfg, train_cfg = presets.preset(args.preset)
        words = word_refs.find_words(saved, args.words, args.resume)
    else:
        name = args.preset or ("paper" if args.dataset or config.configured("coco_karpathy") else "demo")
        if args.preset is None and name == "demo":
            log.info("COCO is not configured (config key 'coco_karpathy', %s): training on the built-in demo world "
                     "with --preset demo", config.env_name("coco_karpathy"))
        model_cfg, train_cfg = presets.preset(name)
        words = None
    model_cfg, train_cfg = config.apply_settings(model_cfg, train_cfg, args.set)
    flags = {"dataset": args.dataset, "split": args.split, "val_split": args.val_split, "epochs": args.epochs,
             "batch_size": args.batch_size, "seed": args.seed, "workers": args.workers}
    train_cfg = TrainConfig(**{**asdict(train_cfg), **{k: v for k, v in flags.items() if v is not None}})
    if resumed is not None:
        resumed = check_resume(resumed, model_cfg, train_cfg, args.allow_changes)
    else:
        model_cfg = replace(model_cfg, trunk_init=source or model_cfg.trunk_init)
        check_trunk_source(model_cfg, args.preset or "paper")
    return model_cfg, train_cfg, str(args.words) if args.words and not resumed else words, resumed


def run_folder(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    """Where the run writes: ``--out``, else the resumed checkpoint's own folder, else ``runs/<preset>``, which a
    new run takes only when it holds no other run's checkpoints."""
    from misc.store import checkpoint

    if args.out:
        return args.out
    if args.resume:
        return args.resume.parent
    out = config.RUNS / (args.preset or ("demo" if cfg.dataset == "demo" else "paper"))
    held = [name for name in (checkpoint.LAST, checkpoint.BEST) if (out / name).exists()]
    if held:
        raise UserError(f"{out} holds another run ({held[0]}): continue it with --resume {out / held[0]}, or start "
                        f"this one in another folder with --out DIR")
    return out


def trunk_source(args: argparse.Namespace) -> str | None:
    """``ModelConfig.trunk_init`` as the flags choose it (plain data, recorded in the checkpoint), or None."""
    if args.init:
        return f"checkpoint:{args.init.resolve()}"
    if args.resnet_weights:
        path = config.path("resnet_weights") if args.resnet_weights == CONFIGURED else args.resnet_weights
        return f"file:{path.resolve()}"
    if args.weights:
        return args.weights
    return "scratch" if args.from_scratch else None


def check_trunk_source(model_cfg: ModelConfig, preset: str) -> None:
    """A new run names its trunk's start, a weights file it names exists, and the original release's files start
    DSVE only (before any data loads)."""
    from misc.store import checkpoint
    from models.joint import system_class
    from models.trunks import IMAGENET_WEIGHTS, trunk_weights_file

    if not model_cfg.trunk_init:
        raise UserError(f"preset {preset!r} needs a trunk to start from: --init CKPT (the original release's "
                          f"pretrained_classif_152_2400.pth.tar), --resnet-weights [FILE] (a torchvision state dict; "
                          f"default: config key resnet_weights), --weights {'|'.join(IMAGENET_WEIGHTS)} "
                          f"(torchvision's, from torch hub's cache) or --from-scratch")
    if model_cfg.trunk_init.startswith("checkpoint:"):
        init = model_cfg.trunk_init.removeprefix("checkpoint:")
        if (not system_class(model_cfg.arch).starts_from_original_release
                and checkpoint.kind(checkpoint.read(init)) != checkpoint.FORMAT):
            raise UserError(f"--init {init}: not a checkpoint of this project; the original release's networks "
                            f"initialise DSVE only: start the model.arch={model_cfg.arch} trunk with --weights, "
                            f"--resnet-weights or --from-scratch")
    elif model_cfg.trunk_init != "scratch":
        trunk_weights_file(model_cfg.trunk, model_cfg.trunk_init)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # torch loads only from here on: --help and argument errors stay fast
    from misc.store import checkpoint
    from misc.train import distributed, run as training
    from misc.devices import resolve_device

    model_cfg, cfg, words_path, resumed = configure(args)
    out = run_folder(args, cfg)
    if args.export and args.export.resolve() == out.resolve():
        raise UserError(f"--export {args.export} is the run folder: export to another folder")
    options = training.RunOptions(out=out, words=words_path, amp=args.amp, limit=args.limit,
                                  channels_last=args.channels_last, save_every=args.save_every,
                                  progress=not args.no_progress, resume=resumed)
    context = distributed.setup(resolve_device(args.device))
    try:
        training.train(model_cfg, cfg, options, context)
        if args.export and context.is_main:
            source = out / (checkpoint.BEST if (out / checkpoint.BEST).is_file() else checkpoint.LAST)
            written = checkpoint.export_file(source, args.export)
            log.info("exported %s to %s: %s", source, args.export, ", ".join(path.name for path in written))
    finally:
        distributed.teardown(context)


if __name__ == "__main__":
    run(main)
