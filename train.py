"""Train DSVE-Loc (paper §4.1): staged Adam training with the hard-negative triplet loss.

    python train.py                      # COCO when configured in misc/config.py, else the built-in demo world
    python train.py --preset demo        # small model on the demo world, minutes on 2 CPU cores
    python train.py --resume runs/paper/last.pth.tar
"""
from __future__ import annotations

import argparse
import functools
import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from misc import checkpoint, config, demo
from misc.cli import add_device_args, run
from misc.config import ConfigError, ModelConfig, TrainConfig
from misc.datasets import PairCollate, PairDataset, load_records, train_transform
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
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<preset>)")
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def main() -> None:
    args = parse_args()
    model_cfg, cfg, words_path = configure(args)
    device = resolve_device(args.device)
    amp = args.amp if device.type == "cuda" else None
    if args.amp and amp is None:
        log.info("--amp ignored: mixed precision runs on CUDA only")
    is_demo = cfg.dataset == "demo"
    if is_demo:
        demo.ensure(config.DEMO_DIR)
    words = load_word_vectors(Path(words_path) if words_path else config.path("word_vectors", demo=is_demo))
    if words.dim != model_cfg.word_dim:
        raise ConfigError(f"word vectors {words.source} are {words.dim}-d but the model expects "
                          f"model.word_dim={model_cfg.word_dim}")
    train_records = load_records(cfg.dataset, cfg.split)[: args.limit]
    val_records = load_records(cfg.dataset, cfg.val_split)
    out = args.out or config.RUNS / (args.preset or ("demo" if is_demo else "paper"))
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    model: JointEmbedding = build_model(model_cfg).to(device)
    if args.resnet_weights:
        model.image.load_trunk_weights(args.resnet_weights)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    start, best_rsum, history = 0, float("-inf"), []
    if args.resume:
        state = checkpoint.load(args.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start, best_rsum, history = state["epoch"], state["best_rsum"], state["metrics"].get("history", [])
        log.info("resumed %s at epoch %d", args.resume, start)

    dataset = PairDataset(train_records, train_transform(cfg), cfg.captions_per_image)
    collate = PairCollate(words)
    loss_fn = functools.partial(triplet_loss, margin=cfg.margin, hardest=cfg.loss == "hard")
    val_protocol = ("1k",) if len(val_records) >= 1000 else ("full",)
    log.info("training %s on %d %s images (%d pairs/epoch), validating on %d; device %s; run folder %s",
             model_cfg.trunk, len(train_records), cfg.dataset, len(dataset), len(val_records), device, out)
    writer = SummaryWriter(str(out / "tensorboard"))
    saved_config = {"model": asdict(model_cfg), "train": asdict(cfg),
                    "word_vectors": checkpoint.portable_path(words.source)}
    for epoch in range(start, cfg.epochs):
        parts = enter_stage(model, epoch, cfg)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.workers, collate_fn=collate, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, loader, optimizer, loss_fn, device, amp, scaler,
                                progress=not args.no_progress, description=f"epoch {epoch}")
        scheduler.step()
        metrics = evaluate_records(model, val_records, words, device, cfg.eval_size, val_protocol,
                                   workers=cfg.workers, amp=amp, progress=not args.no_progress)
        rsum = metrics[val_protocol[0]]["rsum"]
        history.append({"epoch": epoch, "lr": lr, "trained": parts, **stats, "val_rsum": rsum})
        for key in ("loss", "seconds", "data_seconds", "pairs_per_s", "oov_rate"):
            writer.add_scalar(f"train/{key}", stats[key], epoch)
        writer.add_scalar("train/lr", lr, epoch)
        for direction in ("caption_retrieval", "image_retrieval"):
            for key, value in metrics[val_protocol[0]][direction].items():
                writer.add_scalar(f"val/{direction}/{key}", value, epoch)
        writer.add_scalar("val/rsum", rsum, epoch)
        writer.flush()
        is_best = rsum > best_rsum
        best_rsum = max(best_rsum, rsum)
        checkpoint.atomic_save({
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": saved_config,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(), "epoch": epoch + 1,
            "best_rsum": best_rsum, "metrics": {"val": metrics, "history": history}}, out / "last.pth.tar")
        if is_best:
            shutil.copyfile(out / "last.pth.tar", out / ".best.tmp")
            (out / ".best.tmp").replace(out / "best.pth.tar")
        log.info("epoch %d: lr %.2e, trained %s, loss %.4f, %.0f s (%.0f pairs/s, data wait %.0f s), val rsum %.1f%s",
                 epoch, lr, "+".join(parts), stats["loss"], stats["seconds"], stats["pairs_per_s"],
                 stats["data_seconds"], rsum, " (best)" if is_best else "")
    writer.close()
    if history:
        log.info("validation (%s images):\n%s", len(val_records), format_table(metrics))


if __name__ == "__main__":
    run(main)
