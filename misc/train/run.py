"""The training run of ``train.py`` (paper §4.1, and the matchmap system): a model, its optimizer and schedule,
the epochs with their checkpoints, mid-epoch saves and stop signals, validation and TensorBoard. ``train.py``
parses the flags and decides the configuration; this module runs it (it is imported only then, so that
``train.py --help`` loads no torch)."""
from __future__ import annotations

import argparse
import logging
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from misc.store import checkpoint, word_refs
from misc import config
from misc.data import demo
from misc.train import distributed
from misc.config import TrainConfig
from misc.data.datasets import PairCollate, PairDataset, load_records, train_transform
from misc.eval.encode import evaluate_records
from misc.train.loop import train_one_epoch
from misc.errors import UserError, first_line
from misc.eval.retrieval import format_table
from misc.train.schedule import build_optimizer, build_scheduler, describe, enter_stage, epoch_loss, loss_kind
from misc.train.tblog import TrainLog
from misc.data.words import load_word_vectors
from models.config import ModelConfig
from models.joint import Model, build_model

log = logging.getLogger("train")


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
    (:class:`misc.train.distributed.EpochSampler`) and each item's augmentation from (seed, epoch, item)
    (:class:`misc.data.datasets.PairDataset`), so a resumed run replays exactly the epochs it has not finished; one
    resumed mid-epoch also restores the generators' state at its checkpoint."""
    random.seed(cfg.seed * 100_003 + epoch * 101 + rank)
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)


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


def train(args: argparse.Namespace, model_cfg: ModelConfig, cfg: TrainConfig, words_path: Path | str | None, out: Path,
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
    chosen = words_path or cfg.words
    words = load_word_vectors(Path(chosen) if chosen else config.path(words_key(model_cfg, is_demo), demo=is_demo))
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
    board = TrainLog(out / "tensorboard", steps_per_epoch) if main_process else None
    stored, reference = word_refs.reference(words.source)
    saved_config = {"model": asdict(model_cfg), "train": asdict(cfg), "word_vectors": stored, "words": reference}

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
            if board is not None:
                board.start_epoch(epoch, position.partial, loss_kind(cfg, epoch))

            def after_step(totals: dict, epoch: int = epoch) -> None:
                if board is not None:
                    board.step(totals, optimizer.param_groups[0]["lr"])
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
                board.end_epoch(stats, metrics[val_protocol[0]])
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
    if board is not None:
        board.finish(saved_config, position.best_rsum, position.val and position.val[val_protocol[0]])
        if position.val:
            log.info("validation (%s images):\n%s", len(val_records), format_table(position.val))

