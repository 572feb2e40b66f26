"""The training schedule of §4.1 in one place: one Adam optimizer, one step-decay scheduler built once,
and the stage of each epoch (which parts train, which stay frozen)."""
from __future__ import annotations

import torch
from torch import nn

from misc.config import TrainConfig
from models.joint import JointEmbedding


def build_optimizer(model: JointEmbedding, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over every parameter; parameters frozen in the current stage get no gradient and are skipped."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr halved at each epoch of ``cfg.lr_halve_epochs`` (paper: 2..6); stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_halve_epochs, gamma=0.5)


def frozen_modules(model: JointEmbedding, epoch: int, cfg: TrainConfig) -> list[nn.Module]:
    """Modules that do not train at ``epoch``.

    Before ``text_from_epoch`` the SRU is frozen; before ``trunk_from_epoch`` the trunk and the 1x1 conv are;
    afterwards only the trunk layers named in ``frozen_trunk`` (paper: conv1, bn1, layer1, layer2) stay frozen.
    The projection A, b always trains.
    """
    frozen: list[nn.Module] = []
    if epoch < cfg.text_from_epoch:
        frozen.append(model.text)
    if epoch < cfg.trunk_from_epoch:
        frozen += [model.image.trunk, model.image.adapt]
    else:
        frozen += [getattr(model.image.trunk, name) for name in cfg.frozen_trunk]
    return frozen


def enter_stage(model: JointEmbedding, epoch: int, cfg: TrainConfig) -> list[str]:
    """Put ``model`` in training mode for ``epoch``: frozen parts get no gradient and keep their batch-norm
    statistics (eval mode). Returns the names of the parts that train."""
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for module in frozen_modules(model, epoch, cfg):
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    parts = {"trunk": model.image.trunk, "1x1 conv": model.image.adapt, "projection": model.image.proj,
             "SRU": model.text}
    return [name for name, part in parts.items() if any(p.requires_grad for p in part.parameters())]
