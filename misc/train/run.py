"""The training run of ``train.py`` (paper §4.1, and the matchmap system): its data, a model with its optimizer
and schedule, the epochs with their checkpoints, mid-epoch saves and stop signals, validation and TensorBoard.
``train.py`` parses the flags and decides the configuration and the :class:`RunOptions`; this module runs them (it
is imported only then, so that ``train.py --help`` loads no torch)."""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from misc import config
from misc.config import TrainConfig
from misc.data.datasets import PairCollate, PairDataset, Record, load_split, prepare_dataset, train_transform
from misc.data.decoded import Replacing, Undecodable
from misc.data.mix import Count, check_names, training_records
from misc.data.words import WordVectors, load_word_vectors
from misc.errors import UserError
from misc.eval.encode import evaluate_records
from misc.eval.retrieval import format_table
from misc.store import checkpoint, results, word_refs
from misc.train import distributed
from misc.train.loop import Health, train_one_epoch
from misc.store.locks import FolderLock
from misc.train.schedule import build_optimizer, build_scheduler, describe, enter_stage, epoch_loss, loss_kind
from misc.train.state import Position, Resume, restore, rng_state, seed_for, set_rng_state
from misc.train.tblog import TrainLog
from models.config import ModelConfig
from models.joint import Model, build_model

log = logging.getLogger("train")
IN_USE = "let it finish, or stop it and continue it later with --resume"  # what a refused run is told


@dataclass(frozen=True)
class RunOptions:
    """How a configuration runs: where, from which word vectors and checkpoint, and with which speed and saving
    options (mixed precision and the memory format change the numbers only by rounding)."""

    out: Path  # the run folder
    words: Path | str | None = None  # word-vector file; None: TrainConfig.words, else the configured key's
    amp: str | None = None  # mixed precision on CUDA: bf16 | fp16
    limit: int | None = None  # train on the first N images only
    channels_last: bool = False  # the trunk's memory format
    save_every: int | None = None  # also write last.pth.tar every N steps within an epoch
    progress: bool = True  # progress bars (main process)
    resume: Resume | None = None  # continue this run


@dataclass
class Data:
    """A run's data: the word vectors, the training pairs (each dataset's count) with this process's loader, the
    validation images."""

    words: WordVectors
    train_records: list[Record]
    counts: list[Count]
    val_records: list[Record]
    dataset: PairDataset
    sampler: distributed.EpochSampler
    loader: Replacing
    batch: int  # per process
    steps_per_epoch: int
    undecodable: dict[str, Undecodable]  # train, val: images found not to decode, ahead or when drawn (or resumed)

    @property
    def val_protocol(self) -> str:
        """Validation on 1k-image folds when there are that many images, else on all of them."""
        return "1k" if len(self.val_records) >= 1000 else "full"


@dataclass
class Learner:
    """The network and what trains it: optimizer, lr scheduler, fp16 gradient scaler, the trunk's memory format."""

    model: Model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format


def new_model(model_cfg: ModelConfig) -> Model:
    """A model for a new run, its trunk started from ``model_cfg.trunk_init``."""
    if model_cfg.trunk_init.startswith("checkpoint:"):
        model = build_model(model_cfg)
        log.info(checkpoint.init_from(model, model_cfg.trunk_init.removeprefix("checkpoint:")))
        return model
    return build_model(model_cfg, init_trunk=True)


def load_data(model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions, context: distributed.Context) -> Data:
    """The word vectors (checked against the model), the training and validation records and the loader of this
    process's share of each epoch; one-line errors for a batch that does not split or fill a step."""
    if cfg.batch_size % context.world_size:
        raise UserError(f"batch size {cfg.batch_size} (the global batch) does not split over "
                        f"{context.world_size} processes")
    check_names(cfg.datasets)
    first = cfg.datasets[0]  # validates, and with the demo world the default word vectors are its own
    if context.is_main:
        for name in cfg.datasets:
            prepare_dataset(name)
    distributed.barrier(context)
    chosen = run.words or cfg.words
    words = load_word_vectors(Path(chosen) if chosen else
                              config.path(config.default_words_key(model_cfg.arch, first == "demo"),
                                          demo=first == "demo"))
    if words.dim != model_cfg.word_dim:
        raise UserError(f"word vectors {words.source} are {words.dim}-d but the model expects "
                        f"model.word_dim={model_cfg.word_dim}")
    train_records, counts, train_unreadable = training_records(cfg, run.limit)
    log.info("training data: %s", "; ".join(map(str, counts)))
    log.info(words.oov_report([caption for record in train_records for caption in record.captions]))
    val_records, val_unreadable = load_split(first, cfg.val_split)
    words.units = model_cfg.text_units
    kept = run.resume.state.get("added_words") if run.resume else None
    if kept:  # a resumed run reads the vectors its checkpoint drew
        words.add(kept["words"], kept["vectors"].numpy())
    elif model_cfg.unknown_words == "random":
        drawn = words.draw_unknown([c for record in train_records + val_records for c in record.captions], cfg.seed)
        log.info("model.unknown_words=random: drew %d word vectors from the table's mean and std (seed %d)", drawn,
                 cfg.seed)
    seen = {record.image for record in val_records}.intersection(record.image for record in train_records)
    if seen and not cfg.allow_test_overlap:
        raise UserError(f"{'+'.join(cfg.datasets)}: {len(seen)} training images of split {cfg.split!r} are in the "
                        f"validation split {cfg.val_split!r} of {first}, e.g. {min(seen)}; choose disjoint splits "
                        f"(--split, --val-split) or pass --set train.allow_test_overlap=true")
    dataset = PairDataset(train_records, train_transform(cfg), cfg.captions_per_image, cfg.seed, cfg.group_captions)
    batch = cfg.batch_size // context.world_size
    # train.steps_per_epoch > 0: that many batches drawn with replacement, else one pass over the items
    steps_per_epoch = cfg.steps_per_epoch or len(dataset) // context.world_size // batch
    if not steps_per_epoch:
        raise UserError(f"batch size {cfg.batch_size} is more than the {len(dataset)} items of an epoch "
                        f"({'images' if cfg.group_captions else 'pairs'}): no step would train; lower --batch-size")
    sampler = distributed.EpochSampler(dataset, context, cfg.seed, cfg.steps_per_epoch * cfg.batch_size)
    # the loader's own generator: making an epoch's iterator leaves the global one (dropout's) untouched
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.workers,
                        collate_fn=PairCollate(words), pin_memory=context.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    met = run.resume.state.get("metrics", {}).get("unreadable_images", {}) if run.resume else {}
    undecodable = {split: Undecodable(f"{split} image", action, [*ahead, *results.listed_images(met.get(split))])
                   for split, ahead, action in (("train", train_unreadable, "replaced by the next one that decodes"),
                                                ("val", val_unreadable, "left out of the ranking with its captions"))}
    return Data(words, train_records, counts, val_records, dataset, sampler, Replacing(loader, undecodable["train"]),
                batch, steps_per_epoch, undecodable)


def build_learner(model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions, amp: str | None,
                  device: torch.device) -> Learner:
    """The model (a new one, or the resumed run's before its weights load) with its optimizer, scheduler and
    scaler, the same in every process."""
    torch.manual_seed(cfg.seed)  # identical initial weights in every process
    # a resumed run's weights come from its checkpoint: its trunk is not initialised again
    if run.resume is None:
        model = new_model(model_cfg).to(device)
    else:
        with checkpoint.naming(run.resume.path):
            model = build_model(model_cfg).to(device)
    memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
    model.image.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return Learner(model, optimizer, build_scheduler(optimizer, cfg), scaler, memory_format)


def stop(number: int, path: Path) -> NoReturn:
    """Exit after a stop signal (status 128 + its number), the run's position written to ``path``."""
    log.info("stopped by %s: continue with python train.py --resume %s", signal.Signals(number).name, path)
    raise SystemExit(128 + number)


class MidEpochSaver:
    """After each step of an epoch: write the run's position to ``path`` every ``every`` steps (but at the epoch's
    last, whose own checkpoint follows) and at the first step after a stop signal, then stop. Every process calls
    it: the checkpoint holds each one's random state."""

    def __init__(self, snapshot: Callable[..., dict], path: Path, every: int | None, steps_per_epoch: int,
                 signals: distributed.StopSignals, context: distributed.Context) -> None:
        self.snapshot, self.path, self.every, self.steps_per_epoch = snapshot, path, every, steps_per_epoch
        self.signals, self.context = signals, context

    def __call__(self, epoch: int, totals: dict[str, float]) -> None:
        """After a step of ``epoch``, whose running sums (steps done included) are ``totals``."""
        steps = totals["steps"]
        number = self.signals.received()
        if number or (self.every and steps % self.every == 0 and steps < self.steps_per_epoch):
            rng = distributed.gather_objects(rng_state(self.context.device), self.context)
            if self.context.is_main:
                checkpoint.atomic_save(self.snapshot(epoch, step=steps, partial=dict(totals), rng=rng), self.path)
            distributed.barrier(self.context)
        if number:
            stop(number, self.path)


class Trainer:
    """The epochs of a run from its position: each one's stage, steps, validation and checkpoints (the main process
    validates and writes), and TensorBoard."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions, data: Data, learner: Learner,
                 position: Position, context: distributed.Context, amp: str | None,
                 signals: distributed.StopSignals) -> None:
        self.cfg, self.run, self.data, self.learner, self.position = cfg, run, data, learner, position
        self.context, self.amp, self.signals = context, amp, signals
        self.board = TrainLog(run.out / "tensorboard", data.steps_per_epoch) if context.is_main else None
        stored, reference = word_refs.reference(data.words.source)
        self.saved_config = {"model": asdict(model_cfg), "train": asdict(cfg), "word_vectors": stored,
                             "words": reference}
        self.saver = MidEpochSaver(self.snapshot, run.out / checkpoint.LAST, run.save_every, data.steps_per_epoch,
                                   signals, context)
        self.epoch = position.epoch
        self.health = Health(cfg.skip_nonfinite, position.skipped)
        resumed = run.resume.state.get("resumed_with_changes", []) if run.resume else []
        changes = [f"at epoch {position.epoch}: {change}" for change in run.resume.changes] if run.resume else []
        self.changes = [*resumed, *changes]  # settings changed on purpose at a resume (--allow-changes)

    def snapshot(self, epoch: int, **within: Any) -> dict:
        """The training checkpoint after ``epoch`` epochs (and ``within`` the next one); never one holding a
        non-finite value (the run's earlier checkpoints are kept instead)."""
        learner, position = self.learner, self.position
        for name, tensor in learner.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"epoch {epoch}: the model's {name} is not finite, so no checkpoint is written and "
                                f"the run's last ones are kept; lower train.lr or set train.grad_clip")
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": self.saved_config,
                "model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
                "scheduler": learner.scheduler.state_dict(),
                "scaler": learner.scaler.state_dict() if learner.scaler else None, "epoch": epoch,
                "best_rsum": position.best_rsum, "best_epoch": position.best_epoch,
                "metrics": {"val": position.val, "history": position.history,
                            "unreadable_images": {split: results.unreadable_images(found.listed())
                                                  for split, found in self.data.undecodable.items()}},
                "skipped_steps": self.health.skipped, "resumed_with_changes": self.changes,
                "data": [asdict(count) for count in self.data.counts],
                **({"added_words": self.data.words.added_rows()} if self.data.words.added else {}), **within}

    def fit(self) -> None:
        """Train every epoch the run has not finished; stop at an epoch's end after a stop signal."""
        model = self.learner.model
        network, wrapped_parts = model, None
        for epoch in range(self.position.epoch, self.cfg.epochs):
            seed_for(self.cfg, epoch, self.context.rank)
            parts = enter_stage(model, epoch, self.cfg)
            if self.context.distributed and parts != wrapped_parts:
                # DDP registers the parameters that need gradients when it is built: re-wrap when the stage changes.
                network, wrapped_parts = DistributedDataParallel(model), parts
            lr = self.learner.optimizer.param_groups[0]["lr"]
            stats = self.train_epoch(network, epoch)
            self.learner.scheduler.step()
            for met in distributed.gather_objects(self.data.undecodable["train"].listed(), self.context):
                self.data.undecodable["train"].merge(met)  # every process's, for the main one's checkpoint
            if self.context.is_main:
                self.end_epoch(epoch, lr, parts, stats)
            distributed.barrier(self.context)
            number = self.signals.received()
            if number and epoch + 1 < self.cfg.epochs:
                stop(number, self.run.out / checkpoint.LAST)

    def train_epoch(self, network: torch.nn.Module, epoch: int) -> dict[str, float]:
        """The steps of ``epoch`` (those left of it, when resumed mid-way): its training statistics."""
        position, data, learner, device = self.position, self.data, self.learner, self.context.device
        if position.step:  # resumed mid-epoch: the same random state, the rest of the same batches
            set_rng_state(position.rng[self.context.rank], device)
        data.dataset.set_epoch(epoch)
        data.sampler.set_epoch(epoch, position.step * data.batch)
        if self.board is not None:
            self.board.start_epoch(epoch, position.partial, loss_kind(self.cfg, epoch))
        self.epoch = epoch
        stats = train_one_epoch(network, data.loader, learner.optimizer, epoch_loss(self.cfg, epoch), device, self.amp,
                                learner.scaler, learner.memory_format, self.cfg.grad_clip,
                                progress=self.context.is_main and self.run.progress, description=f"epoch {epoch}",
                                totals=position.partial, after_step=self.after_step,
                                global_batch=self.context.distributed, health=self.health,
                                loss_name=loss_kind(self.cfg, epoch))
        position.step, position.partial = 0, None
        return stats

    def after_step(self, totals: dict[str, float]) -> None:
        if self.board is not None:
            self.board.step(totals, self.learner.optimizer.param_groups[0]["lr"])
        self.saver(self.epoch, totals)

    def end_epoch(self, epoch: int, lr: float, parts: list[str], stats: dict[str, float]) -> None:
        """Validate after ``epoch`` and write its checkpoint (and the best), on the main process."""
        position, protocol = self.position, self.data.val_protocol
        metrics = evaluate_records(self.learner.model, self.data.val_records, self.data.words, self.context.device,
                                   self.cfg.eval_size, (protocol,), workers=self.cfg.workers, amp=self.amp,
                                   progress=self.run.progress, undecodable=self.data.undecodable["val"])
        rsum = metrics[protocol]["rsum"]
        kind = loss_kind(self.cfg, epoch)
        position.history.append({"epoch": epoch, "lr": lr, "trained": parts, "loss_kind": kind, **stats,
                                 "val_rsum": rsum})
        position.val = metrics
        self.board.end_epoch(stats, metrics[protocol])
        is_best = rsum > position.best_rsum
        if is_best:
            position.best_rsum, position.best_epoch = rsum, epoch + 1
        checkpoint.save_training(self.snapshot(epoch + 1), self.run.out, is_best)
        log.info("epoch %d: lr %.2e, trained %s, %s loss %.4f, %.0f s (%.0f pairs/s, data wait %.0f s), "
                 "val rsum %.1f%s", epoch, lr, "+".join(parts), kind, stats["loss"], stats["seconds"],
                 stats["pairs_per_s"], stats["data_seconds"], rsum, " (best)" if is_best else "")

    def finish(self) -> None:
        """Close TensorBoard with the run's settings and final metrics; the last validation table in the log."""
        if self.board is None:
            return
        val = self.position.val
        self.board.finish(self.saved_config, self.position.best_rsum, val and val[self.data.val_protocol])
        if val:
            log.info("validation (%s images):\n%s", len(self.data.val_records), format_table(val))


def train(model_config: ModelConfig, train_config: TrainConfig, run: RunOptions,
          context: distributed.Context) -> None:
    """Train ``model_config`` by ``train_config`` in this process of ``context``: a new run, or ``run.resume``
    continued exactly (a run resumed mid-epoch replays the rest of that epoch's batches with the same random
    state)."""
    # One writer per run folder: a second train.py (or --resume) into it is refused while this one runs.
    with FolderLock(run.out, IN_USE) if context.is_main else contextlib.nullcontext():
        device = context.device
        if not context.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        amp = run.amp if device.type == "cuda" else None
        if run.amp and amp is None:
            log.info("--amp ignored: mixed precision runs on CUDA only")
        data = load_data(model_config, train_config, run, context)
        run.out.mkdir(parents=True, exist_ok=True)
        learner = build_learner(model_config, train_config, run, amp, device)
        position = Position()
        if run.resume is not None:
            position = restore(run.resume, learner.model, learner.optimizer, learner.scheduler, learner.scaler,
                               train_config, context)
            if context.is_main and run.out.resolve() == run.resume.path.parent.resolve():
                checkpoint.check_best(run.out, run.resume.state)
        drawn = train_config.steps_per_epoch * train_config.batch_size  # batches drawn with replacement, else a pass
        log.info("training %s on %d %s images (%d pairs/epoch), validating on %d of %s; %d process(es) on %s; run "
                 "folder %s", model_config.trunk, len(data.train_records), "+".join(train_config.datasets),
                 (drawn or len(data.dataset)) * data.dataset.per_item, len(data.val_records),
                 train_config.datasets[0], context.world_size, device, run.out)
        log.info(describe(train_config, model_config.arch))
        with distributed.StopSignals(context) as signals:
            trainer = Trainer(model_config, train_config, run, data, learner, position, context, amp, signals)
            trainer.fit()
        trainer.finish()
