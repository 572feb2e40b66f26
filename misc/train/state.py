"""Where a training run stands and how it continues exactly: its :class:`Position` (epochs and steps done, running
sums, validation record), the checkpoint it resumes from, and the random state of its steps."""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from misc.config import TrainConfig, from_dict
from misc.errors import UserError, first_line
from misc.store import checkpoint
from misc.train import distributed
from models.config import ModelConfig
from models.joint import Model

log = logging.getLogger("train")
# What a resumed run may change: how long it goes on, how it loads data and what it is allowed to read, not what a
# step computes.
HARMLESS = ("train.epochs", "train.workers", "train.allow_test_overlap")


@dataclass(frozen=True)
class Resume:
    """The training checkpoint a run continues from: its file (named in messages; its folder may hold the run's best)
    and its content, loaded once."""

    path: Path
    state: dict
    changes: tuple[str, ...] = ()  # settings changed on purpose at this resume (--allow-changes), as "key: old -> new"


def changed_settings(saved: dict, model: ModelConfig, train: TrainConfig) -> list[str]:
    """``section.key: old -> new`` for each setting that differs from the checkpoint's configuration ``saved``
    (the trunk's starting point aside: a resumed run's weights come from its checkpoint)."""
    before = {"model": asdict(from_dict(ModelConfig, saved["model"])),
              "train": asdict(from_dict(TrainConfig, saved.get("train", {})))}
    after = {"model": asdict(model), "train": asdict(train)}
    return [f"{section}.{key}: {before[section][key]!r} -> {value!r}" for section in ("model", "train")
            for key, value in after[section].items()
            if value != before[section][key] and f"{section}.{key}" != "model.trunk_init"]


def check_resume(resume: Resume, model: ModelConfig, train: TrainConfig, allow: bool) -> Resume:
    """Refuse settings of a resumed run that differ from its checkpoint's (a changed model, data or schedule would
    make another run than the one continued) unless ``allow``, which records them; :data:`HARMLESS` ones are said
    and kept."""
    changes = changed_settings(resume.state["config"], model, train)
    harmless = [change for change in changes if change.split(":")[0] in HARMLESS]
    others = [change for change in changes if change not in harmless]
    if harmless:
        log.info("resuming %s with %s", resume.path, "; ".join(harmless))
    if others and not allow:
        raise UserError(f"--resume {resume.path}: these settings differ from the run's ({'; '.join(others)}); "
                        f"resume without them, or pass --allow-changes to continue with them on purpose")
    return replace(resume, changes=tuple(others))


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
    skipped: int = 0  # non-finite steps skipped so far in the run (train.skip_nonfinite)


def restore(source: Resume, model: Model, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler | None, cfg: TrainConfig, context: distributed.Context) -> Position:
    """Load a training checkpoint's weights and optimizer, scheduler and scaler states; its :class:`Position`."""
    state, path = source.state, source.path
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
                        state["metrics"].get("val"), state.get("skipped_steps", 0))
    if position.step and (len(position.rng or ()) != context.world_size
                          or state["config"]["train"].get("batch_size") != cfg.batch_size):
        raise UserError(f"{path} was written mid-epoch by {len(position.rng or ())} process(es) with batch size "
                        f"{state['config']['train'].get('batch_size')}: resume it with the same")
    log.info("resumed %s at epoch %d%s", path, position.epoch, f", step {position.step}" if position.step else "")
    return position


def seed_for(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """The random draws of an epoch's steps (dropout) derive from (seed, epoch, rank), its order from (seed, epoch)
    (:class:`misc.train.distributed.EpochSampler`) and each item's augmentation from (seed, epoch, item)
    (:class:`misc.data.datasets.PairDataset`), so a resumed run replays exactly the epochs it has not finished; one
    resumed mid-epoch also restores the generators' state at its checkpoint."""
    random.seed(cfg.seed * 100_003 + epoch * 101 + rank)
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)


def rng_state(device: torch.device) -> dict:
    """This process's random generators (dropout draws from them; augmentation has its own, per item)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back the generators of :func:`rng_state` (the Python one's state comes back from a checkpoint as lists)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
