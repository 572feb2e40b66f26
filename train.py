"""Train DSVE-Loc (paper §4.1): staged Adam training with the hard-negative triplet loss.

    python train.py                      # COCO when configured in misc/config.py, else the built-in demo world
    python train.py --preset demo        # small model on the demo world, minutes on 2 CPU cores
    python train.py --resume runs/paper/last.pth.tar
    python train.py --preset paper --init pretrained_classif_152_2400.pth.tar   # the original release's start
    python train.py --preset paper --weights IMAGENET1K_V1   # torchvision's ImageNet trunk, from torch hub's cache
    torchrun --nproc_per_node=4 train.py --preset paper --init ...   # one process per GPU; global --batch-size
"""
from __future__ import annotations

import argparse
import logging
import random
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from misc import checkpoint, config, demo, distributed
from misc.cli import add_device_args, add_set_arg, parser_for, positive_int, run
from misc.config import TrainConfig
from misc.errors import UserError
from models.config import ModelConfig
from misc.datasets import PairCollate, PairDataset, load_records, train_transform
from misc.files import atomic_path
from misc.engine import evaluate_records, resolve_device, train_one_epoch
from misc.retrieval import format_table
from misc.schedule import build_optimizer, build_scheduler, describe, enter_stage, epoch_loss, loss_kind
from misc.words import load_word_vectors
from models.joint import JointEmbedding, build_model
from models.visual import IMAGENET_WEIGHTS, trunk_weights_file

log = logging.getLogger("train")
CONFIGURED = Path("<config key resnet_weights>")  # --resnet-weights without a file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("--preset", choices=list(config.PRESETS), default=None,
                        help="paper (default when COCO is configured; the original code's schedule), paper-text "
                             "(the schedule as the paper's text states it) or demo")
    add_set_arg(parser)
    parser.add_argument("--dataset", help="coco | flickr30k | demo | a JSON-lines caption file")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--limit", type=positive_int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--words", type=Path, help="word-vector file (default: config key word_vectors)")
    parser.add_argument("--resume", type=Path, help="continue a run from its last.pth.tar")
    start = parser.add_argument_group("what a new run starts from (the paper preset needs one)")
    trunk = start.add_mutually_exclusive_group()
    trunk.add_argument("--init", type=Path, metavar="CKPT",
                       help="the original classification network (pretrained_classif_152_2400.pth.tar: trunk and "
                            "1x1 conv), an original model.pth.tar or a checkpoint (every weight)")
    trunk.add_argument("--resnet-weights", nargs="?", const=CONFIGURED, type=Path, metavar="FILE",
                       help="a torchvision state dict of the trunk (default: config key resnet_weights)")
    trunk.add_argument("--weights", choices=IMAGENET_WEIGHTS,
                       help="torchvision's ImageNet weights of the trunk, from torch hub's cache (never downloaded)")
    trunk.add_argument("--from-scratch", action="store_true", help="a randomly initialised trunk")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<preset>)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for the trunk")
    add_device_args(parser)
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, str | None]:
    """Model and training config: the resumed run's, else preset + flags. Falls back to the demo world."""
    source = trunk_source(args)
    if args.resume and source:
        raise UserError("--init, --resnet-weights, --weights and --from-scratch start a new run; --resume "
                          "continues from the run's own weights")
    if args.resume:
        saved = checkpoint.load(args.resume)["config"]
        model_cfg = config.from_dict(ModelConfig, saved["model"])
        train_cfg = config.from_dict(TrainConfig, saved["train"])
        words = saved.get("word_vectors")
    else:
        name = args.preset
        if name is None:
            name = "paper" if args.dataset or config.configured("coco_karpathy") else "demo"
            if name == "demo":
                log.info("COCO is not configured (config key 'coco_karpathy', %s): training on the built-in demo "
                         "world with --preset demo", config.env_name("coco_karpathy"))
        model_cfg, train_cfg = config.preset(name)
        words = None
    model_cfg, train_cfg = config.apply_settings(model_cfg, train_cfg, args.set)
    flags = {"dataset": args.dataset, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
             "workers": args.workers}
    train_cfg = TrainConfig(**{**asdict(train_cfg), **{k: v for k, v in flags.items() if v is not None}})
    if not args.resume:
        model_cfg = replace(model_cfg, trunk_init=source or model_cfg.trunk_init)
        check_trunk_source(model_cfg, args.preset or "paper")
    return model_cfg, train_cfg, str(args.words) if args.words else words


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
    """A new run names its trunk's start, and a weights file it names exists (before any data loads)."""
    if not model_cfg.trunk_init:
        raise UserError(f"preset {preset!r} needs a trunk to start from: --init CKPT (the original release's "
                          f"pretrained_classif_152_2400.pth.tar), --resnet-weights [FILE] (a torchvision state dict; "
                          f"default: config key resnet_weights), --weights {'|'.join(IMAGENET_WEIGHTS)} "
                          f"(torchvision's, from torch hub's cache) or --from-scratch")
    if model_cfg.trunk_init != "scratch" and not model_cfg.trunk_init.startswith("checkpoint:"):
        trunk_weights_file(model_cfg.trunk, model_cfg.trunk_init)


def new_model(model_cfg: ModelConfig) -> JointEmbedding:
    """A model for a new run, its trunk started from ``model_cfg.trunk_init``."""
    if model_cfg.trunk_init.startswith("checkpoint:"):
        model = build_model(model_cfg)
        log.info(checkpoint.init_from(model, model_cfg.trunk_init.removeprefix("checkpoint:")))
        return model
    return build_model(model_cfg, init_trunk=True)


def seed_for(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Every random draw of an epoch (augmentation, dropout, shuffling) derives from (seed, epoch, rank), so a
    resumed run, on any number of processes, replays exactly the epochs it has not finished."""
    random.seed(cfg.seed * 100_003 + epoch * 101 + rank)
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_cfg, cfg, words_path = configure(args)
    context = distributed.setup(resolve_device(args.device))
    try:
        train(args, model_cfg, cfg, words_path, context)
    finally:
        distributed.teardown(context)


def train(args: argparse.Namespace, model_cfg: ModelConfig, cfg: TrainConfig, words_path: str | None,
          context: distributed.Context) -> None:
    device, main_process = context.device, context.is_main
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)
    amp = args.amp if device.type == "cuda" else None
    if args.amp and amp is None:
        log.info("--amp ignored: mixed precision runs on CUDA only")
    if cfg.batch_size % context.world_size:
        raise UserError(f"batch size {cfg.batch_size} (the global batch) does not split over "
                          f"{context.world_size} processes")
    is_demo = cfg.dataset == "demo"
    if is_demo and main_process:
        demo.ensure(config.DEMO_DIR)
    distributed.barrier(context)
    words = load_word_vectors(Path(words_path) if words_path else config.path("word_vectors", demo=is_demo))
    if words.dim != model_cfg.word_dim:
        raise UserError(f"word vectors {words.source} are {words.dim}-d but the model expects "
                          f"model.word_dim={model_cfg.word_dim}")
    train_records = load_records(cfg.dataset, cfg.split)[: args.limit]
    val_records = load_records(cfg.dataset, cfg.val_split)
    out = args.out or config.RUNS / (args.preset or ("demo" if is_demo else "paper"))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # identical initial weights in every process
    # a resumed run's weights come from its checkpoint: its trunk is not initialised again
    model = (build_model(model_cfg) if args.resume else new_model(model_cfg)).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.image.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    start, best_rsum, history = 0, float("-inf"), []
    if args.resume:
        state = checkpoint.load(args.resume)
        if "optimizer" not in state:
            raise UserError(f"{args.resume} holds no training state to resume (optimizer, scheduler); "
                              f"start a new run from its weights with --init")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, best_rsum, history = state["epoch"], state["best_rsum"], state["metrics"].get("history", [])
        log.info("resumed %s at epoch %d", args.resume, start)

    dataset = PairDataset(train_records, train_transform(cfg), cfg.captions_per_image, cfg.seed,
                          cfg.group_captions)
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size // context.world_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.workers, collate_fn=PairCollate(words), pin_memory=device.type == "cuda")
    val_protocol = ("1k",) if len(val_records) >= 1000 else ("full",)
    log.info("training %s on %d %s images (%d pairs/epoch), validating on %d; %d process(es) on %s; run folder %s",
             model_cfg.trunk, len(train_records), cfg.dataset, len(dataset) * dataset.per_item, len(val_records),
             context.world_size, device, out)
    log.info(describe(cfg))
    writer = SummaryWriter(str(out / "tensorboard")) if main_process else None
    saved_config = {"model": asdict(model_cfg), "train": asdict(cfg),
                    "word_vectors": checkpoint.portable_path(words.source)}
    network, wrapped_parts = model, None
    for epoch in range(start, cfg.epochs):
        seed_for(cfg, epoch, context.rank)
        parts = enter_stage(model, epoch, cfg)
        if context.distributed and parts != wrapped_parts:
            # DDP registers the parameters that need gradients when it is built: re-wrap when the stage changes.
            network, wrapped_parts = DistributedDataParallel(model), parts
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        loss_fn = epoch_loss(cfg, epoch, context.distributed)
        stats = train_one_epoch(network, loader, optimizer, loss_fn, device, amp, scaler, memory_format,
                                cfg.grad_clip, progress=main_process and not args.no_progress,
                                description=f"epoch {epoch}")
        scheduler.step()
        if main_process:
            metrics = evaluate_records(model, val_records, words, device, cfg.eval_size, val_protocol,
                                       workers=cfg.workers, amp=amp, progress=not args.no_progress)
            rsum = metrics[val_protocol[0]]["rsum"]
            history.append({"epoch": epoch, "lr": lr, "trained": parts, "loss_kind": loss_kind(cfg, epoch), **stats,
                            "val_rsum": rsum})
            log_epoch(writer, epoch, lr, stats, metrics[val_protocol[0]])
            is_best = rsum > best_rsum
            best_rsum = max(best_rsum, rsum)
            checkpoint.atomic_save({
                "format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": saved_config,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch + 1, "best_rsum": best_rsum,
                "metrics": {"val": metrics, "history": history}}, out / "last.pth.tar")
            if is_best:
                with atomic_path(out / "best.pth.tar") as temporary:
                    shutil.copyfile(out / "last.pth.tar", temporary)
            log.info("epoch %d: lr %.2e, trained %s, %s loss %.4f, %.0f s (%.0f pairs/s, data wait %.0f s), "
                     "val rsum %.1f%s", epoch, lr, "+".join(parts), loss_kind(cfg, epoch), stats["loss"],
                     stats["seconds"], stats["pairs_per_s"], stats["data_seconds"], rsum, " (best)" if is_best else "")
        distributed.barrier(context)
    if writer is not None:
        writer.close()
        if history:
            log.info("validation (%s images):\n%s", len(val_records), format_table(metrics))


def log_epoch(writer: SummaryWriter, epoch: int, lr: float, stats: dict, metrics: dict) -> None:
    """TensorBoard scalars of one epoch: training loss, lr, timings and validation recall."""
    for key in ("loss", "seconds", "data_seconds", "pairs_per_s", "oov_rate"):
        writer.add_scalar(f"train/{key}", stats[key], epoch)
    writer.add_scalar("train/lr", lr, epoch)
    for direction in ("caption_retrieval", "image_retrieval"):
        for key, value in metrics[direction].items():
            writer.add_scalar(f"val/{direction}/{key}", value, epoch)
    writer.add_scalar("val/rsum", metrics["rsum"], epoch)
    writer.flush()


if __name__ == "__main__":
    run(main)
