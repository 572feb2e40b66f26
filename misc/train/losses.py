"""Bidirectional ranking losses on a batch's score matrix: the triplet losses of the paper (eq. 5 and 7), the
N-pair loss and the sampled triplet loss of the matchmap system (Das, Ghouse, Verma, Li 2019).

Every loss takes ``scores`` (B, B) with s[i, j] the score of image i with caption j, row i of both inputs being a
positive pair, and optionally ``ids`` (B,) naming the image of each pair, so that two pairs of the same image are
not used as each other's negatives. :data:`LOSSES` declares each loss once: its ``TrainConfig.loss`` name, its
TensorBoard tag, its description in the schedule table and its builder; :func:`build_loss` turns a name into a
function.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]  # loss_fn(scores, ids=None) -> scalar


def same_image(scores: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """(B, B) bool: True where caption j belongs to the image of pair i (the diagonal included)."""
    if ids is None:
        ids = torch.arange(scores.shape[0], device=scores.device)
    return ids.view(-1, 1) == ids.view(1, -1)


def ranking_loss(scores: torch.Tensor, margin: float = 0.2, hardest: bool = True,
                 ids: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's bidirectional triplet loss on a score matrix, summed over the batch, in float32.

    - ``hardest=True``, eq. 7: for each image the hardest negative caption and for each caption the hardest
      negative image, i.e. sum_i max_j [a - s(x_i, y_i) + s(x_i, y_j)]_+ + max_j [a - s(x_i, y_i) + s(x_j, y_i)]_+.
    - ``hardest=False``, eq. 5: the same hinge summed over every negative.
    """
    scores = scores.float()
    positive = scores.diagonal()
    same = same_image(scores, ids)
    caption_cost = (margin - positive.view(-1, 1) + scores).clamp(min=0).masked_fill(same, 0)  # image anchors
    image_cost = (margin - positive.view(1, -1) + scores).clamp(min=0).masked_fill(same, 0)  # caption anchors
    if hardest:
        return caption_cost.max(dim=1).values.sum() + image_cost.max(dim=0).values.sum()
    return caption_cost.sum() + image_cost.sum()


def npair_loss(scores: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric N-pair loss: softmax cross-entropy over the batch's scores (no temperature) in both directions,
    each averaged over the batch,

        L = 1/B sum_i -log softmax_j s(x_i, y_j) [i] + 1/B sum_i -log softmax_j s(x_j, y_i) [i].

    Other pairs of the same image are left out of each softmax."""
    scores = scores.float()
    same = same_image(scores, ids)
    scores = scores.masked_fill(same & ~torch.eye(len(scores), dtype=torch.bool, device=scores.device),
                                float("-inf"))
    target = torch.arange(len(scores), device=scores.device)
    return F.cross_entropy(scores, target) + F.cross_entropy(scores.t(), target)


def impostors(same: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each pair i, one index j drawn uniformly among the pairs of other images (B,); a pair with none gets
    itself."""
    weights = (~same).float()
    lonely = weights.sum(dim=1) == 0
    weights[lonely] = same[lonely].float()
    return torch.multinomial(weights.cpu(), 1, generator=generator).view(-1).to(same.device)


def sampled_triplet_loss(scores: torch.Tensor, margin: float = 0.1, ids: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The matchmap system's triplet alternative: for each pair one impostor caption and one impostor image drawn
    at random from the other images' pairs, averaged over the batch,

        L = 1/B sum_i [a - s(x_i, y_i) + s(x_i, y_c(i))]_+ + [a - s(x_i, y_i) + s(x_m(i), y_i)]_+."""
    scores = scores.float()
    same = same_image(scores, ids)
    rows = torch.arange(len(scores), device=scores.device)
    caption, image = impostors(same, generator), impostors(same, generator)
    positive = scores.diagonal()
    return ((margin - positive + scores[rows, caption]).clamp(min=0)
            + (margin - positive + scores[image, rows]).clamp(min=0)).mean()


@dataclass(frozen=True)
class Loss:
    """One training loss: its ``TrainConfig.loss`` name, its TensorBoard tag (``train/loss/<tag>``), its description
    in the schedule table (:func:`misc.train.schedule.describe`) and ``build(margin)``, the function of
    (scores, ids=None)."""

    name: str
    tag: str
    description: str
    build: Callable[[float], LossFn]


LOSSES = {loss.name: loss for loss in (
    Loss("hard", "triplet_hardest", "hardest negatives (eq. 7)",
         lambda margin: functools.partial(ranking_loss, margin=margin, hardest=True)),
    Loss("sum", "triplet_sum", "sum over negatives (eq. 5)",
         lambda margin: functools.partial(ranking_loss, margin=margin, hardest=False)),
    Loss("npair", "npair", "N-pair", lambda margin: npair_loss),  # no margin: a softmax
    Loss("triplet", "triplet_sampled", "sampled triplets",
         lambda margin: functools.partial(sampled_triplet_loss, margin=margin)),
)}


def build_loss(name: str, margin: float) -> LossFn:
    """``TrainConfig.loss`` as a function of (scores, ids=None): one of :data:`LOSSES`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: one of {', '.join(LOSSES)}")
    return LOSSES[name].build(margin)
