"""One training epoch of either system (models/joint.py): the batch's score matrix, the loss on it, the step."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc.train import distributed
from misc.store.checkpoint import unwrap
from misc.devices import autocast
from misc.train.losses import LossFn
from models.joint import Model


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


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    device: torch.device, amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format, grad_clip: float | None = None,
                    progress: bool = True, description: str = "train", totals: dict[str, float] | None = None,
                    after_step: Callable[[dict[str, float]], None] | None = None,
                    global_batch: bool = False) -> dict[str, float]:
    """One pass over ``loader`` of (images, Encoded captions, image id of each caption); the model (either system,
    bare or wrapped in DDP) must already be in its stage. Each step's loss is ``loss_fn(scores, ids=ids)`` on the
    model's score matrix of the batch (:func:`batch_scores`): with n captions per image (consecutive), each image
    is the positive of its n captions. ``global_batch`` (DDP) scores the global batch. ``grad_clip`` caps the
    global gradient norm of each step.

    ``totals`` are the running sums (loss, steps, pairs, oov, tokens) of the steps an epoch resumed mid-way has
    already done (a checkpoint's ``partial``); ``after_step(totals)`` is called after every step (mid-epoch
    checkpoints, stop signals). Returns the epoch's mean loss and out-of-vocabulary rate, and this pass's wall and
    data-wait seconds and pairs per second.
    """
    bare = unwrap(model)
    totals = dict(totals or {"loss": 0.0, "steps": 0, "pairs": 0, "oov": 0, "tokens": 0})
    pairs_before, waited = totals["pairs"], 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for images, captions, ids in bar:
        waited += time.perf_counter() - tick
        images = images.to(device, memory_format=memory_format, non_blocking=True)
        words, lengths = captions.words.to(device, non_blocking=True), captions.lengths.to(device)
        with autocast(device, amp):
            image_out, text_out = model(images, words, lengths)
        scores, pair_ids = batch_scores(bare, image_out, text_out, lengths, ids.to(device), global_batch)
        loss = loss_fn(scores, ids=pair_ids)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        for key, value in (("loss", loss.item()), ("steps", 1), ("pairs", len(ids)), ("oov", captions.oov),
                           ("tokens", captions.tokens)):
            totals[key] += value
        bar.set_postfix(loss=f"{totals['loss'] / totals['steps']:.3f}")
        if after_step is not None:
            after_step(totals)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"loss": totals["loss"] / max(totals["steps"], 1), "seconds": seconds, "data_seconds": waited,
            "pairs_per_s": (totals["pairs"] - pairs_before) / max(seconds, 1e-9),
            "oov_rate": totals["oov"] / max(totals["tokens"], 1)}
