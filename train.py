"""Train DSVE-Loc (paper §4.1): staged Adam training with the hard-negative triplet loss.

    python train.py                      # COCO when configured in misc/config.py, else the built-in demo world
    python train.py --preset demo        # small model on the demo world, minutes on 2 CPU cores
    python train.py --resume runs/paper/last.pth.tar
    python train.py --init pretrained_classif_152_2400.pth.tar   # the original release's image initialisation
    torchrun --nproc_per_node=4 train.py --preset paper   # one process per GPU; --batch-size is the global batch
"""
from __future__ import annotations

import argparse
import functools
import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from misc import checkpoint, config, demo, distributed
from misc.cli import add_device_args, run
from misc.config import ConfigError, ModelConfig, TrainConfig
from misc.datasets import PairCollate, PairDataset, load_records, train_transform
from misc.files import atomic_path
from misc.engine import evaluate_records, resolve_device, train_one_epoch
from misc.loss import triplet_loss
from misc.retrieval import format_table
from misc.schedule import build_optimizer, build_scheduler, enter_stage
from misc.words import load_word_vectors
from models.joint import JointEmbedding, build_model

log = logging.getLogger("train")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(config.PRESETS), default=None,
                        help="paper (default when COCO is configured) or demo")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any field of ModelConfig (model.) or TrainConfig (train.), e.g. train.epochs=3")
    parser.add_argument("--dataset", help="coco | flickr30k | demo | a JSON-lines caption file")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--limit", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--words", type=Path, help="word-vector file (default: config key word_vectors)")
    parser.add_argument("--resnet-weights", type=Path, help="ImageNet state dict to initialise the trunk")
    parser.add_argument("--resume", type=Path, help="continue a run from its last.pth.tar")
    parser.add_argument("--init", type=Path,
                        help="initialise from the original classification network (pretrained_classif_152_2400"
                             ".pth.tar: trunk and 1x1 conv), an original model.pth.tar or a checkpoint (every weight)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<preset>)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for the trunk")
    add_device_args(parser)
    return parser.parse_args()


def configure(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, str | None]:
    """Model and training config: the resumed run's, else preset + flags. Falls back to the demo world."""
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
    return model_cfg, train_cfg, str(args.words) if args.words else words


def seed_for(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Every random draw of an epoch (augmentation, dropout, shuffling) derives from (seed, epoch, rank), so a
    resumed run, on any number of processes, replays exactly the epochs it has not finished."""
    random.seed(cfg.seed * 100_003 + epoch * 101 + rank)
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)


def loss_kind(cfg: TrainConfig, epoch: int) -> str:
    """'sum' (eq. 5) during the first ``sum_loss_epochs``, then ``cfg.loss`` ('hard', eq. 7, or 'sum')."""
    return cfg.loss if epoch >= cfg.sum_loss_epochs else "sum"


def epoch_loss(cfg: TrainConfig, epoch: int, context: distributed.Context) -> Callable[..., torch.Tensor]:
    """The triplet loss of ``epoch`` (see :func:`loss_kind`), over the global batch under DDP."""
    loss_fn = functools.partial(triplet_loss, margin=cfg.margin, hardest=loss_kind(cfg, epoch) == "hard")
    return distributed.global_loss(loss_fn) if context.distributed else loss_fn


def main() -> None:
    args = parse_args()
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
        raise ConfigError(f"batch size {cfg.batch_size} (the global batch) does not split over "
                          f"{context.world_size} processes")
    is_demo = cfg.dataset == "demo"
    if is_demo and main_process:
        demo.ensure(config.DEMO_DIR)
    distributed.barrier(context)
    words = load_word_vectors(Path(words_path) if words_path else config.path("word_vectors", demo=is_demo))
    if words.dim != model_cfg.word_dim:
        raise ConfigError(f"word vectors {words.source} are {words.dim}-d but the model expects "
                          f"model.word_dim={model_cfg.word_dim}")
    train_records = load_records(cfg.dataset, cfg.split)[: args.limit]
    val_records = load_records(cfg.dataset, cfg.val_split)
    out = args.out or config.RUNS / (args.preset or ("demo" if is_demo else "paper"))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # identical initial weights in every process
    model: JointEmbedding = build_model(model_cfg).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.image.to(memory_format=memory_format)
    if args.resnet_weights:
        model.image.load_trunk_weights(args.resnet_weights)
    if args.init:
        log.info(checkpoint.init_from(model, args.init))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    start, best_rsum, history = 0, float("-inf"), []
    if args.resume:
        state = checkpoint.load(args.resume)
        if "optimizer" not in state:
            raise ConfigError(f"{args.resume} holds no training state to resume (optimizer, scheduler); "
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
        loss_fn = epoch_loss(cfg, epoch, context)
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
