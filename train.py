"""Train DSVE-Loc (paper §4.1): staged Adam training with the hard-negative triplet loss; or the matchmap system
of Das et al. 2019 (model.arch=matchmap: presets das2019 and demo-matchmap), N-pair loss and SGD.

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
import random
import signal
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from misc import checkpoint, config, demo, distributed
from misc.cli import add_device_args, add_set_arg, parser_for, positive_int, run
from misc.config import TrainConfig
from misc.errors import UserError, first_line
from models.config import ModelConfig
from misc.datasets import PairCollate, PairDataset, load_records, train_transform
from misc.engine import evaluate_records, resolve_device, train_one_epoch
from misc.retrieval import format_table
from misc.schedule import build_optimizer, build_scheduler, describe, enter_stage, epoch_loss, loss_kind
from misc.words import load_word_vectors
from models.joint import Model, build_model
from models.trunks import IMAGENET_WEIGHTS, trunk_weights_file

log = logging.getLogger("train")
CONFIGURED = Path("<config key resnet_weights>")  # --resnet-weights without a file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("--preset", choices=list(config.PRESETS), default=None,
                        help="paper (default when COCO is configured; the original code's schedule), paper-text "
                             "(the schedule as the paper's text states it), demo, das2019 (the matchmap system of Das "
                             "et al. 2019) or demo-matchmap")
    add_set_arg(parser)
    parser.add_argument("--dataset", help="coco | flickr30k | demo | a JSON-lines file (data/README.md)")
    parser.add_argument("--split", help="training split (default: config train.split; any name of a JSON-lines file)")
    parser.add_argument("--val-split", help="validation split (default: config train.val_split)")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--limit", type=positive_int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--words", type=Path, help="word-vector file (default: config key word_vectors; "
                                                   "glove_vectors for model.arch=matchmap; the demo world's on it)")
    parser.add_argument("--resume", type=Path,
                        help="continue a run from its last.pth.tar, in that file's folder unless --out says otherwise")
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
    trunk.add_argument("--weights", choices=IMAGENET_WEIGHTS,
                       help="torchvision's ImageNet weights of the trunk, from torch hub's cache (never downloaded)")
    trunk.add_argument("--from-scratch", action="store_true", help="a randomly initialised trunk")
    parser.add_argument("--out", type=Path, help="run folder (default: the resumed run's, else runs/<preset>, "
                                                 "which must not hold another run)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for the trunk")
    add_device_args(parser)
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, str | None, dict | None]:
    """Model and training config: the resumed run's, else preset + flags (the demo world when COCO is not
    configured); the word-vector file, and the resumed checkpoint."""
    source = trunk_source(args)
    if args.resume and source:
        raise UserError("--init, --resnet-weights, --weights and --from-scratch start a new run; --resume "
                          "continues from the run's own weights")
    resumed = checkpoint.load(args.resume) if args.resume else None
    if resumed is not None:
        saved = resumed["config"]
        with checkpoint.naming(args.resume):
            model_cfg = config.from_dict(ModelConfig, saved["model"])
            train_cfg = config.from_dict(TrainConfig, saved.get("train", {}))
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
    flags = {"dataset": args.dataset, "split": args.split, "val_split": args.val_split, "epochs": args.epochs,
             "batch_size": args.batch_size, "seed": args.seed, "workers": args.workers}
    train_cfg = TrainConfig(**{**asdict(train_cfg), **{k: v for k, v in flags.items() if v is not None}})
    if not args.resume:
        model_cfg = replace(model_cfg, trunk_init=source or model_cfg.trunk_init)
        check_trunk_source(model_cfg, args.preset or "paper")
    return model_cfg, train_cfg, str(args.words) if args.words else words, resumed


def run_folder(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    """Where the run writes: ``--out``, else the resumed checkpoint's own folder, else ``runs/<preset>``, which a
    new run takes only when it holds no other run's checkpoints."""
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
    if not model_cfg.trunk_init:
        raise UserError(f"preset {preset!r} needs a trunk to start from: --init CKPT (the original release's "
                          f"pretrained_classif_152_2400.pth.tar), --resnet-weights [FILE] (a torchvision state dict; "
                          f"default: config key resnet_weights), --weights {'|'.join(IMAGENET_WEIGHTS)} "
                          f"(torchvision's, from torch hub's cache) or --from-scratch")
    if model_cfg.trunk_init.startswith("checkpoint:"):
        init = model_cfg.trunk_init.removeprefix("checkpoint:")
        if model_cfg.arch != "dsve" and checkpoint.kind(checkpoint.read(init)) != checkpoint.FORMAT:
            raise UserError(f"--init {init}: not a checkpoint of this project; the original release's networks "
                            f"initialise DSVE only: start the model.arch={model_cfg.arch} trunk with --weights, "
                            f"--resnet-weights or --from-scratch")
    elif model_cfg.trunk_init != "scratch":
        trunk_weights_file(model_cfg.trunk, model_cfg.trunk_init)


def new_model(model_cfg: ModelConfig) -> Model:
    """A model for a new run, its trunk started from ``model_cfg.trunk_init``."""
    if model_cfg.trunk_init.startswith("checkpoint:"):
        model = build_model(model_cfg)
        log.info(checkpoint.init_from(model, model_cfg.trunk_init.removeprefix("checkpoint:")))
        return model
    return build_model(model_cfg, init_trunk=True)


def words_key(model_cfg: ModelConfig, demo: bool) -> str:
    """The config key of the default word vectors: the demo world's on it, else GloVe for the matchmap (Das et al.
    2019) and the skip-thought table for DSVE."""
    return "glove_vectors" if model_cfg.arch == "matchmap" and not demo else "word_vectors"


def seed_for(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """The random draws of an epoch's steps (dropout) derive from (seed, epoch, rank), its order from (seed, epoch)
    (:class:`misc.distributed.EpochSampler`) and each item's augmentation from (seed, epoch, item)
    (:class:`misc.datasets.PairDataset`), so a resumed run replays exactly the epochs it has not finished; one
    resumed mid-epoch also restores the generators' state at its checkpoint."""
    random.seed(cfg.seed * 100_003 + epoch * 101 + rank)
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_cfg, cfg, words_path, resumed = configure(args)
    out = run_folder(args, cfg)
    context = distributed.setup(resolve_device(args.device))
    try:
        train(args, model_cfg, cfg, words_path, out, resumed, context)
    finally:
        distributed.teardown(context)


@dataclass
class Position:
    """Where a run stands: epochs done; within the next one, the steps done, their running sums and every
    process's random state (mid-epoch checkpoints only); the validation record."""

    epoch: int = 0
    step: int = 0
    partial: dict | None = None
    rng: list | None = None
    best_rsum: float = float("-inf")
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    val: dict | None = None


def resume(state: dict, path: Path, model: Model, optimizer: torch.optim.Optimizer, scheduler: Any,
           scaler: torch.amp.GradScaler | None, cfg: TrainConfig, context: distributed.Context) -> Position:
    """Load a training checkpoint's weights and optimizer, scheduler and scaler states; its :class:`Position`."""
    kinds = {"optimizer": dict, "scheduler": dict, "epoch": int, "best_rsum": float, "metrics": dict}
    if not all(isinstance(state.get(key), kind) for key, kind in kinds.items()):
        raise UserError(f"{path} holds no training state to resume ({', '.join(kinds)}); start a new run from its "
                        f"weights with --init")
    checkpoint.load_weights(model, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"{path}: its optimizer state does not fit this model ({first_line(error)})") from None
    position = Position(state["epoch"], state.get("step", 0), state.get("partial"), state.get("rng"),
                        state["best_rsum"], state.get("best_epoch"), state["metrics"].get("history", []),
                        state["metrics"].get("val"))
    if position.step and (len(position.rng or ()) != context.world_size
                          or state["config"]["train"].get("batch_size") != cfg.batch_size):
        raise UserError(f"{path} was written mid-epoch by {len(position.rng or ())} process(es) with batch size "
                        f"{state['config']['train'].get('batch_size')}: resume it with the same")
    log.info("resumed %s at epoch %d%s", path, position.epoch, f", step {position.step}" if position.step else "")
    return position


def rng_state(device: torch.device) -> dict:
    """This process's random generators (dropout draws from them; augmentation has its own, per item)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def stop(number: int, path: Path) -> NoReturn:
    """Exit after a stop signal (status 128 + its number), the run's position written to ``path``."""
    log.info("stopped by %s: continue with python train.py --resume %s", signal.Signals(number).name, path)
    raise SystemExit(128 + number)


def train(args: argparse.Namespace, model_cfg: ModelConfig, cfg: TrainConfig, words_path: str | None, out: Path,
          resumed: dict | None, context: distributed.Context) -> None:
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
    words = load_word_vectors(Path(words_path) if words_path else config.path(words_key(model_cfg, is_demo),
                                                                                demo=is_demo))
    if words.dim != model_cfg.word_dim:
        raise UserError(f"word vectors {words.source} are {words.dim}-d but the model expects "
                          f"model.word_dim={model_cfg.word_dim}")
    train_records = load_records(cfg.dataset, cfg.split)
    if args.limit and args.limit > len(train_records):
        log.warning("--limit %d: %s %s has only %d images; training on all of them", args.limit, cfg.dataset,
                    cfg.split, len(train_records))
    train_records = train_records[: args.limit]
    log.info(words.oov_report([caption for record in train_records for caption in record.captions]))
    val_records = load_records(cfg.dataset, cfg.val_split)
    dataset = PairDataset(train_records, train_transform(cfg), cfg.captions_per_image, cfg.seed,
                          cfg.group_captions)
    batch = cfg.batch_size // context.world_size  # per process
    steps_per_epoch = len(dataset) // context.world_size // batch
    if not steps_per_epoch:
        raise UserError(f"batch size {cfg.batch_size} is more than the {len(dataset)} items of an epoch "
                        f"({'images' if cfg.group_captions else 'pairs'}): no step would train; lower --batch-size")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # identical initial weights in every process
    # a resumed run's weights come from its checkpoint: its trunk is not initialised again
    if resumed is None:
        model = new_model(model_cfg).to(device)
    else:
        with checkpoint.naming(args.resume):
            model = build_model(model_cfg).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.image.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    position = Position()
    if resumed is not None:
        position = resume(resumed, args.resume, model, optimizer, scheduler, scaler, cfg, context)
        if main_process and out.resolve() == args.resume.parent.resolve():
            checkpoint.check_best(out, resumed)

    sampler = distributed.EpochSampler(dataset, context, cfg.seed)
    # the loader's own generator: making an epoch's iterator leaves the global one (dropout's) untouched
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.workers,
                        collate_fn=PairCollate(words), pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    val_protocol = ("1k",) if len(val_records) >= 1000 else ("full",)
    log.info("training %s on %d %s images (%d pairs/epoch), validating on %d; %d process(es) on %s; run folder %s",
             model_cfg.trunk, len(train_records), cfg.dataset, len(dataset) * dataset.per_item, len(val_records),
             context.world_size, device, out)
    log.info(describe(cfg, model_cfg.arch))
    writer = SummaryWriter(str(out / "tensorboard")) if main_process else None
    saved_config = {"model": asdict(model_cfg), "train": asdict(cfg),
                    "word_vectors": checkpoint.portable_path(words.source)}

    def snapshot(epoch: int, **within: Any) -> dict:
        """The training checkpoint after ``epoch`` epochs (and ``within`` the next one)."""
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": saved_config,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "best_rsum": position.best_rsum,
                "best_epoch": position.best_epoch, "metrics": {"val": position.val, "history": position.history},
                **within}

    network, wrapped_parts = model, None
    with distributed.StopSignals(context) as signals:
        for epoch in range(position.epoch, cfg.epochs):
            seed_for(cfg, epoch, context.rank)
            parts = enter_stage(model, epoch, cfg)
            if context.distributed and parts != wrapped_parts:
                # DDP registers the parameters that need gradients when it is built: re-wrap when the stage changes.
                network, wrapped_parts = DistributedDataParallel(model), parts
            if position.step:  # resumed mid-epoch: the same random state, the rest of the same batches
                set_rng_state(position.rng[context.rank], device)
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch, position.step * batch)
            lr = optimizer.param_groups[0]["lr"]

            def after_step(totals: dict, epoch: int = epoch) -> None:
                number = signals.received()
                if number or (args.save_every and totals["steps"] % args.save_every == 0
                              and totals["steps"] < steps_per_epoch):
                    rng = distributed.gather_objects(rng_state(device), context)
                    if main_process:
                        checkpoint.atomic_save(snapshot(epoch, step=totals["steps"], partial=dict(totals), rng=rng),
                                               out / checkpoint.LAST)
                    distributed.barrier(context)
                if number:
                    stop(number, out / checkpoint.LAST)

            stats = train_one_epoch(network, loader, optimizer, epoch_loss(cfg, epoch), device, amp, scaler,
                                    memory_format, cfg.grad_clip, progress=main_process and not args.no_progress,
                                    description=f"epoch {epoch}", totals=position.partial, after_step=after_step,
                                    global_batch=context.distributed)
            position.step, position.partial = 0, None
            scheduler.step()
            if main_process:
                metrics = evaluate_records(model, val_records, words, device, cfg.eval_size, val_protocol,
                                           workers=cfg.workers, amp=amp, progress=not args.no_progress)
                rsum = metrics[val_protocol[0]]["rsum"]
                position.history.append({"epoch": epoch, "lr": lr, "trained": parts,
                                         "loss_kind": loss_kind(cfg, epoch), **stats, "val_rsum": rsum})
                position.val = metrics
                log_epoch(writer, epoch, lr, stats, metrics[val_protocol[0]])
                is_best = rsum > position.best_rsum
                if is_best:
                    position.best_rsum, position.best_epoch = rsum, epoch + 1
                checkpoint.save_training(snapshot(epoch + 1), out, is_best)
                log.info("epoch %d: lr %.2e, trained %s, %s loss %.4f, %.0f s (%.0f pairs/s, data wait %.0f s), "
                         "val rsum %.1f%s", epoch, lr, "+".join(parts), loss_kind(cfg, epoch), stats["loss"],
                         stats["seconds"], stats["pairs_per_s"], stats["data_seconds"], rsum,
                         " (best)" if is_best else "")
            distributed.barrier(context)
            number = signals.received()
            if number and epoch + 1 < cfg.epochs:
                stop(number, out / checkpoint.LAST)
    if writer is not None:
        writer.close()
        if position.val:
            log.info("validation (%s images):\n%s", len(val_records), format_table(position.val))


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
