"""TensorBoard logging of a training run (``tensorboard --logdir runs``), on one axis: steps done.

- every step: its loss, tagged with the loss in use (``train/loss/<tag>``, the tag of
  :data:`misc.train.losses.LOSSES`: ``triplet_hardest`` for eq. 7, ``triplet_sum`` for eq. 5, ``npair``,
  ``triplet_sampled``), and the lr;
- every epoch, at its last step: the epoch's mean loss, timings, out-of-vocabulary rate and validation recall;
- at the end: the hyper-parameters (every model and training setting) with the final validation metrics
  (``add_hparams``), for the HParams dashboard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from misc.train.losses import LOSSES

EPOCH_STATS = ("loss", "seconds", "data_seconds", "pairs_per_s", "oov_rate", "skipped_steps")


class TrainLog:
    """The TensorBoard writer of a run in ``folder`` whose epochs have ``steps_per_epoch`` steps."""

    def __init__(self, folder: Path, steps_per_epoch: int) -> None:
        self.writer = SummaryWriter(str(folder))
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.loss, self.loss_sum, self.steps, self.skipped = 0, "hard", 0.0, 0, 0

    def start_epoch(self, epoch: int, totals: dict[str, float] | None, loss: str) -> None:
        """Enter ``epoch``, trained with ``loss`` (a ``TrainConfig.loss`` name); ``totals`` are the running sums of
        the steps already done in it (an epoch resumed mid-way), or None."""
        self.epoch, self.loss = epoch, loss
        self.loss_sum = totals["loss"] if totals else 0.0
        self.skipped = totals.get("skipped", 0) if totals else 0

    def step(self, totals: dict[str, float], lr: float) -> None:
        """Log the step just done from the epoch's running sums (``misc.train.loop.train_one_epoch``'s ``totals``):
        its loss is the growth of the loss sum."""
        self.steps = self.epoch * self.steps_per_epoch + int(totals["steps"])
        if totals.get("skipped", 0) > self.skipped:  # a non-finite step: counted, not drawn as a loss
            self.skipped = totals["skipped"]
            self.writer.add_scalar("train/skipped_steps", self.skipped, self.steps)
        else:
            self.writer.add_scalar(f"train/loss/{LOSSES[self.loss].tag}", totals["loss"] - self.loss_sum, self.steps)
        self.writer.add_scalar("train/lr", lr, self.steps)
        self.loss_sum = totals["loss"]

    def end_epoch(self, stats: dict[str, float], metrics: dict[str, Any]) -> None:
        """The epoch's training statistics and validation metrics (one protocol's: recall per direction, rsum)."""
        step = (self.epoch + 1) * self.steps_per_epoch
        for key in EPOCH_STATS:
            self.writer.add_scalar(f"epoch/{key}", stats[key], step)
        for direction in ("caption_retrieval", "image_retrieval"):
            for key, value in metrics[direction].items():
                self.writer.add_scalar(f"val/{direction}/{key}", value, step)
        self.writer.add_scalar("val/rsum", metrics["rsum"], step)
        self.writer.flush()

    def finish(self, saved: dict[str, Any], best_rsum: float, metrics: dict[str, Any] | None) -> None:
        """Write the run's settings (a checkpoint's ``config``) with its final validation ``metrics`` and best rsum
        as one HParams session of this run, then close."""
        if metrics is not None:
            final = {"final/best_val_rsum": best_rsum, "final/val_rsum": metrics["rsum"],
                     **{f"final/{direction}/{key}": value for direction in ("caption_retrieval", "image_retrieval")
                        for key, value in metrics[direction].items()}}
            self.writer.add_hparams(hparams(saved), final, run_name=".", global_step=self.steps)
        self.writer.close()


def hparams(saved: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """``model.KEY`` and ``train.KEY`` of a checkpoint's config as values TensorBoard takes (lists and None as
    text), and the word-vector file."""
    values: dict[str, int | float | str | bool] = {"words": str(saved.get("word_vectors"))}
    for section in ("model", "train"):
        for key, value in saved[section].items():
            plain = isinstance(value, (int, float, str, bool))
            values[f"{section}.{key}"] = value if plain else str(value)
    return values
