"""One training epoch of either system (models/joint.py): the batch's score matrix, the loss on it, the step."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from misc.train import distributed
from misc.store.checkpoint import unwrap
from misc.devices import autocast
from misc.errors import UserError
from misc.train.losses import LossFn
from models.joint import Model

log = logging.getLogger(__name__)


@dataclass
class Health:
    """A run's guard against divergence (``train.skip_nonfinite``): a step whose loss or gradient norm is not
    finite updates nothing; up to ``allowed`` such steps of the run are skipped and counted, the next one stops the
    run with one line, so that no non-finite value reaches the weights, the optimizer or a checkpoint."""

    allowed: int = 0
    skipped: int = 0

    def step_is_finite(self, what: str, value: float, where: str) -> bool:
        """Whether ``value`` (the ``what`` of the step ``where``) is finite; a non-finite one is skipped while the
        run's budget lasts, else it ends the run."""
        if math.isfinite(value):
            return True
        if self.skipped >= self.allowed:
            raise UserError(f"{where}: the {what} is {value}; the run stops here and its checkpoints are the last "
                            f"finite ones (lower train.lr or train.grad_clip, or skip up to N such steps with "
                            f"--set train.skip_nonfinite=N)")
        self.skipped += 1
        log.warning("%s: the %s is %s, step skipped (%d of %d allowed)", where, what, value, self.skipped,
                    self.allowed)
        return False


def batch_scores(model: Model, image_out: torch.Tensor, text_out: torch.Tensor, lengths: torch.Tensor,
                 ids: torch.Tensor, global_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The score matrix of a training batch (B, B), row i being the image of caption i, and the image id of each
    pair (B,). With n captions per image (consecutive), each image output is repeated n times before scoring, so
    DSVE's scores are the cosines of today's loss (image_emb @ text_emb.T) exactly. ``global_batch``: over every
    process's batch (:func:`misc.train.distributed.global_outputs`)."""
    image_out = image_out.float().repeat_interleave(len(text_out) // len(image_out), dim=0)
    outputs = (image_out, text_out.float(), lengths, ids)
    if global_batch:
        outputs = distributed.global_outputs(*outputs)
    image_out, text_out, lengths, ids = outputs
    return model.score(image_out, text_out, lengths), ids


def floating_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each floating-point buffer of ``model`` (batch-norm statistics) with a copy of its value."""
    return [(buffer, buffer.clone()) for buffer in model.buffers() if buffer.is_floating_point()]


def gradient_norm(model: torch.nn.Module, clip: float | None) -> float:
    """The global norm of the step's gradients, after capping it at ``clip`` when given."""
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    device: torch.device, amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format, grad_clip: float | None = None,
                    progress: bool = True, description: str = "train", totals: dict[str, float] | None = None,
                    after_step: Callable[[dict[str, float]], None] | None = None,
                    global_batch: bool = False, health: Health | None = None,
                    loss_name: str = "training") -> dict[str, float]:
    """One pass over ``loader`` of (images, Encoded captions, image id of each caption); the model (either system,
    bare or wrapped in DDP) must already be in its stage. Each step's loss is ``loss_fn(scores, ids=ids)`` on the
    model's score matrix of the batch (:func:`batch_scores`): with n captions per image (consecutive), each image
    is the positive of its n captions. ``global_batch`` (DDP) scores the global batch. ``grad_clip`` caps the
    global gradient norm of each step. A step whose loss (``loss_name``) or gradient norm is not finite changes
    nothing and goes to ``health`` (:class:`Health`), which skips it or stops the run; under fp16 the gradient
    scaler skips steps with overflowing gradients itself.

    ``totals`` are the running sums (loss, steps, pairs, oov, tokens, skipped) of the steps an epoch resumed mid-way has
    already done (a checkpoint's ``partial``); ``after_step(totals)`` is called after every step (mid-epoch
    checkpoints, stop signals). Returns the epoch's mean loss and out-of-vocabulary rate, and this pass's wall and
    data-wait seconds and pairs per second.
    """
    bare = unwrap(model)
    health = health or Health()
    totals = {"skipped": 0, **(totals or {"loss": 0.0, "steps": 0, "pairs": 0, "oov": 0, "tokens": 0})}
    pairs_before, waited = totals["pairs"], 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for images, captions, ids in bar:
        waited += time.perf_counter() - tick
        # a skipped step must leave nothing behind, and its forward pass moves batch-norm statistics
        kept = floating_buffers(model) if health.allowed > health.skipped else []
        images = images.to(device, memory_format=memory_format, non_blocking=True)
        words, lengths = captions.words.to(device, non_blocking=True), captions.lengths.to(device)
        with autocast(device, amp):
            image_out, text_out = model(images, words, lengths)
        scores, pair_ids = batch_scores(bare, image_out, text_out, lengths, ids.to(device), global_batch)
        loss = loss_fn(scores, ids=pair_ids)
        value, where = loss.item(), f"{description}, step {int(totals['steps']) + 1}"
        optimizer.zero_grad(set_to_none=True)
        finite = health.step_is_finite(f"{loss_name} loss", value, where)
        if finite:
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            norm = gradient_norm(model, grad_clip)
            finite = scaler is not None or health.step_is_finite("gradient norm", norm, where)
        if finite and scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif finite:
            optimizer.step()
        else:
            for buffer, before in kept:
                buffer.copy_(before)
        for key, step_value in (("loss", value if finite else 0.0), ("steps", 1), ("skipped", not finite),
                                ("pairs", len(ids)), ("oov", captions.oov), ("tokens", captions.tokens)):
            totals[key] += step_value
        bar.set_postfix(loss=f"{totals['loss'] / max(totals['steps'] - totals['skipped'], 1):.3f}")
        if after_step is not None:
            after_step(totals)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"loss": totals["loss"] / max(totals["steps"] - totals["skipped"], 1), "seconds": seconds,
            "data_seconds": waited, "skipped_steps": totals["skipped"],
            "pairs_per_s": (totals["pairs"] - pairs_before) / max(seconds, 1e-9),
            "oov_rate": totals["oov"] / max(totals["tokens"], 1)}
