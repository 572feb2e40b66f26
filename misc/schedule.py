"""The whole training schedule of §4.1 in one place: for every epoch its learning rate, the parts that train and
the loss; the one Adam optimizer and the one step-decay scheduler of a run; entering an epoch's stage.

The paper preset is the schedule the original release's train.py ran, which is one epoch later than the paper's
text (preset ``paper-text``) for the learning rate and the trunk. Its MultiStepLR (milestones 2..6, halving) is
stepped with ``step(epoch)`` at the end of each epoch, so the lr set after epoch e is the one for epoch e + 1
but is computed from e: epoch 3 is the first at 5e-4 and epoch 7 the first at 3.125e-5. The text pipeline is
added to the optimizer after epoch 1 (it trains from epoch 2) and the trunk after epoch ``fepoch`` = 8 (it trains
from epoch 9), with conv1, bn1, layer1 and layer2 left frozen. Every part stays in train mode throughout
(``model.train()``), frozen or not: ``TrainConfig.frozen_mode``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn

from misc.config import TrainConfig
from misc.distributed import global_loss
from misc.loss import triplet_loss
from models.joint import JointEmbedding

PARTS = ("projection", "SRU", "1x1 conv", "trunk")  # the parts that can train, in the order they join
LOSS_NAMES = {"hard": "hardest negatives (eq. 7)", "sum": "sum over negatives (eq. 5)"}


@dataclass(frozen=True)
class Epoch:
    """What one epoch does: its learning rate, the parts that train and the triplet loss ('hard' or 'sum')."""

    epoch: int
    lr: float
    parts: tuple[str, ...]
    loss: str


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """``cfg.lr`` halved once for every epoch of ``cfg.lr_halve_epochs`` up to ``epoch`` included."""
    return cfg.lr * 0.5 ** sum(milestone <= epoch for milestone in cfg.lr_halve_epochs)


def parts_at(cfg: TrainConfig, epoch: int) -> tuple[str, ...]:
    """The parts that train at ``epoch``: the projection A, b always; the SRU from ``text_from_epoch``; the 1x1
    conv and the trunk (but its ``frozen_trunk`` layers) from ``trunk_from_epoch``."""
    trains = {"projection": True, "SRU": epoch >= cfg.text_from_epoch,
              "1x1 conv": epoch >= cfg.trunk_from_epoch, "trunk": epoch >= cfg.trunk_from_epoch}
    return tuple(part for part in PARTS if trains[part])


def loss_kind(cfg: TrainConfig, epoch: int) -> str:
    """'sum' (eq. 5) during the first ``sum_loss_epochs``, then ``cfg.loss`` ('hard', eq. 7, or 'sum')."""
    return cfg.loss if epoch >= cfg.sum_loss_epochs else "sum"


def resolve(cfg: TrainConfig) -> list[Epoch]:
    """The schedule of every epoch of the run."""
    return [Epoch(epoch, lr_at(cfg, epoch), parts_at(cfg, epoch), loss_kind(cfg, epoch))
            for epoch in range(cfg.epochs)]


def describe(cfg: TrainConfig) -> str:
    """The resolved schedule as a compact table: one row per run of epochs that train alike."""
    rows: list[list] = []
    for plan in resolve(cfg):
        same = rows and (rows[-1][1], rows[-1][2], rows[-1][3]) == (plan.lr, plan.parts, plan.loss)
        if same:
            rows[-1][0][1] = plan.epoch
        else:
            rows.append([[plan.epoch, plan.epoch], plan.lr, plan.parts, plan.loss])
    frozen = ", ".join(cfg.frozen_trunk) or "none"
    lines = [f"schedule: Adam; frozen parts in {cfg.frozen_mode} mode; trunk layers never trained: {frozen}",
             f"{'epochs':<8}{'lr':<11}{'trains':<36}loss"]
    for (first, last), lr, parts, loss in rows:
        epochs = str(first) if first == last else f"{first}-{last}"
        lines.append(f"{epochs:<8}{lr:<11.3e}{', '.join(parts):<36}{LOSS_NAMES[loss]}")
    return "\n".join(lines)


def epoch_loss(cfg: TrainConfig, epoch: int, distributed: bool = False) -> Callable[..., torch.Tensor]:
    """The triplet loss of ``epoch`` (see :func:`loss_kind`), over the global batch under DDP."""
    loss_fn = functools.partial(triplet_loss, margin=cfg.margin, hardest=loss_kind(cfg, epoch) == "hard")
    return global_loss(loss_fn) if distributed else loss_fn


def build_optimizer(model: JointEmbedding, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over every parameter; parameters frozen in the current stage get no gradient and are skipped, as the
    original's parameters were before it added them to its optimizer."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr halved at each epoch of ``cfg.lr_halve_epochs``, stepped once after every epoch: it gives
    :func:`lr_at` for every epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_halve_epochs, gamma=0.5)


def part_modules(model: JointEmbedding) -> dict[str, nn.Module]:
    return {"projection": model.image.proj, "SRU": model.text, "1x1 conv": model.image.adapt,
            "trunk": model.image.trunk}


def frozen_modules(model: JointEmbedding, epoch: int, cfg: TrainConfig) -> list[nn.Module]:
    """Modules that do not train at ``epoch``: the parts not in :func:`parts_at`, and the ``frozen_trunk`` layers
    (paper: conv1, bn1, layer1, layer2) once the trunk trains."""
    parts = parts_at(cfg, epoch)
    frozen = [module for part, module in part_modules(model).items() if part not in parts]
    if "trunk" in parts:
        frozen += [getattr(model.image.trunk, name) for name in cfg.frozen_trunk]
    return frozen


def enter_stage(model: JointEmbedding, epoch: int, cfg: TrainConfig) -> list[str]:
    """Put ``model`` in training mode for ``epoch``: frozen parts get no gradient; with ``frozen_mode`` 'train'
    they stay in train mode as in the original (batch norm normalises with the batch's statistics and updates its
    running ones, dropout drops), with 'eval' they keep their batch-norm statistics and drop nothing.
    Returns the names of the parts that train."""
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for module in frozen_modules(model, epoch, cfg):
        module.train(cfg.frozen_mode == "train")
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return [name for name, part in part_modules(model).items() if any(p.requires_grad for p in part.parameters())]
