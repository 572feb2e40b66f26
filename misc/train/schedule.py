"""The whole training schedule of §4.1 in one place: for every epoch its learning rate, the parts that train and
the loss; the one optimizer and the one lr scheduler of a run; entering an epoch's stage. Both systems train by
it: DSVE's parts (projection, SRU, 1x1 conv, trunk) and the matchmap's (3x3 conv head, LSTM, trunk).

The paper preset is the schedule the original release's train.py ran, which is one epoch later than the paper's
text (preset ``paper-text``) for the learning rate and the trunk. Its MultiStepLR (milestones 2..6, halving) is
stepped with ``step(epoch)`` at the end of each epoch, so the lr set after epoch e is the one for epoch e + 1
but is computed from e: epoch 3 is the first at 5e-4 and epoch 7 the first at 3.125e-5. The text pipeline is
added to the optimizer after epoch 1 (it trains from epoch 2) and the trunk after epoch ``fepoch`` = 8 (it trains
from epoch 9), with conv1, bn1, layer1 and layer2 left frozen. Every part stays in train mode throughout
(``model.train()``), frozen or not: ``TrainConfig.frozen_mode``. The matchmap preset (Das et al. 2019) trains
every part from the start with SGD and momentum, its lr divided by 10 every 10 epochs (``lr_decay_every``; their
code's first division comes one epoch earlier, ``lr_decay_first``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from misc.config import TrainConfig
from misc.train.losses import LOSSES, LossFn, build_loss
from models.joint import Model, system_class
from models.trunks import stage_modules


@dataclass(frozen=True)
class Epoch:
    """What one epoch does: its learning rate, the parts that train and the loss (a ``TrainConfig.loss`` name)."""

    epoch: int
    lr: float
    parts: tuple[str, ...]
    loss: str


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """``cfg.lr`` times ``lr_decay`` once every ``lr_decay_every`` epochs from ``lr_decay_first`` (by default
    ``lr_decay_every``) when that is set, else halved once for every epoch of ``cfg.lr_halve_epochs`` up to
    ``epoch`` included."""
    if cfg.lr_decay_every:
        first = cfg.lr_decay_first or cfg.lr_decay_every
        return cfg.lr * cfg.lr_decay ** (0 if epoch < first else 1 + (epoch - first) // cfg.lr_decay_every)
    return cfg.lr * 0.5 ** sum(milestone <= epoch for milestone in cfg.lr_halve_epochs)


def parts_at(cfg: TrainConfig, epoch: int, arch: str = "dsve") -> tuple[str, ...]:
    """The parts of ``arch`` that train at ``epoch``. DSVE: the projection A, b always; the SRU from
    ``text_from_epoch``; the 1x1 conv and the trunk (but its ``frozen_trunk`` layers) from ``trunk_from_epoch``.
    Matchmap: the 3x3 conv head always; the LSTM from ``text_from_epoch``; the trunk from ``trunk_from_epoch``."""
    names = system_class(arch).PARTS  # in the order they join
    first, text, *late = names
    starts = {first: 0, text: cfg.text_from_epoch, **dict.fromkeys(late, cfg.trunk_from_epoch)}
    return tuple(part for part in names if epoch >= starts[part])


def loss_kind(cfg: TrainConfig, epoch: int) -> str:
    """'sum' (eq. 5) during the first ``sum_loss_epochs``, then ``cfg.loss`` ('hard', eq. 7, 'sum', 'npair' or
    'triplet')."""
    return cfg.loss if epoch >= cfg.sum_loss_epochs else "sum"


def resolve(cfg: TrainConfig, arch: str = "dsve") -> list[Epoch]:
    """The schedule of every epoch of the run."""
    return [Epoch(epoch, lr_at(cfg, epoch), parts_at(cfg, epoch, arch), loss_kind(cfg, epoch))
            for epoch in range(cfg.epochs)]


def optimizer_name(cfg: TrainConfig) -> str:
    return f"SGD (momentum {cfg.momentum:g})" if cfg.optimizer == "sgd" else "Adam"


def describe(cfg: TrainConfig, arch: str = "dsve") -> str:
    """The resolved schedule as a compact table: one row per run of epochs that train alike."""
    rows: list[list] = []
    for plan in resolve(cfg, arch):
        same = rows and (rows[-1][1], rows[-1][2], rows[-1][3]) == (plan.lr, plan.parts, plan.loss)
        if same:
            rows[-1][0][1] = plan.epoch
        else:
            rows.append([[plan.epoch, plan.epoch], plan.lr, plan.parts, plan.loss])
    frozen = ", ".join(cfg.frozen_trunk) or "none"
    lines = [f"schedule: {optimizer_name(cfg)}; frozen parts in {cfg.frozen_mode} mode; trunk layers never "
             f"trained: {frozen}",
             f"{'epochs':<8}{'lr':<11}{'trains':<36}loss"]
    for (first, last), lr, parts, loss in rows:
        epochs = str(first) if first == last else f"{first}-{last}"
        lines.append(f"{epochs:<8}{lr:<11.3e}{', '.join(parts):<36}{LOSSES[loss].description}")
    return "\n".join(lines)


def epoch_loss(cfg: TrainConfig, epoch: int) -> LossFn:
    """The loss of ``epoch`` (see :func:`loss_kind`) on a batch's score matrix: ``loss_fn(scores, ids=ids)``; with
    ``loss_reduction`` 'mean' divided by the batch size B (the rows of the score matrix), as Das et al.'s code
    divides its summed hinges."""
    loss_fn = build_loss(loss_kind(cfg, epoch), cfg.margin)
    if cfg.loss_reduction == "sum":
        return loss_fn
    return lambda scores, ids=None: loss_fn(scores, ids=ids) / scores.shape[0]


def build_optimizer(model: Model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or SGD with ``cfg.momentum`` (``cfg.optimizer``), over every parameter; parameters frozen in the
    current stage get no gradient and are skipped, as the original's parameters were before it added them to its
    optimizer."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once after every epoch, it gives :func:`lr_at` for every epoch: lr x ``lr_decay`` every
    ``lr_decay_every`` epochs (StepLR; from ``lr_decay_first`` when set, MultiStepLR) when that is set, else halved
    at each epoch of ``cfg.lr_halve_epochs``."""
    first = cfg.lr_decay_first or cfg.lr_decay_every
    if cfg.lr_decay_every and first != cfg.lr_decay_every:
        milestones = list(range(first, max(cfg.epochs, first + 1), cfg.lr_decay_every))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_decay)
    if cfg.lr_decay_every:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_halve_epochs, gamma=0.5)


def frozen_modules(model: Model, epoch: int, cfg: TrainConfig) -> list[nn.Module]:
    """Modules that do not train at ``epoch``: the parts not in :func:`parts_at`, and the ``frozen_trunk`` stages
    (paper: conv1, bn1, layer1, layer2; :mod:`models.trunks` names every trunk's stages) once the trunk trains."""
    parts = parts_at(cfg, epoch, model.config.arch)
    frozen = [module for part, module in model.parts().items() if part not in parts]
    if "trunk" in parts:
        frozen += stage_modules(model.image.trunk, model.image.grid.stages, cfg.frozen_trunk)
    return frozen


def enter_stage(model: Model, epoch: int, cfg: TrainConfig) -> list[str]:
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
    return [name for name, part in model.parts().items() if any(p.requires_grad for p in part.parameters())]
