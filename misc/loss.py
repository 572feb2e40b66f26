"""Triplet ranking losses on cosine similarity (paper eq. 5 and 7)."""
from __future__ import annotations

import torch


def triplet_loss(images: torch.Tensor, captions: torch.Tensor, margin: float = 0.2, hardest: bool = True,
                 ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional triplet loss over a batch of matching pairs (row i of both inputs is a positive pair).

    images, captions: (B, d) unit vectors. ``ids`` (B,) optionally names the image of each pair, so that two
    pairs of the same image are not used as each other's negatives.
    - ``hardest=True``, eq. 7: for each image the hardest negative caption and for each caption the hardest
      negative image, i.e. sum_i max_j [a - s(x_i, y_i) + s(x_i, y_j)]_+ + max_j [a - s(x_i, y_i) + s(x_j, y_i)]_+.
    - ``hardest=False``, eq. 5: the same hinge summed over every negative.
    Summed over the batch, computed in float32.
    """
    scores = images.float() @ captions.float().t()  # (B, B): s(x_i, y_j)
    positive = scores.diagonal()
    if ids is None:
        ids = torch.arange(scores.shape[0], device=scores.device)
    same = ids.view(-1, 1) == ids.view(1, -1)
    caption_cost = (margin - positive.view(-1, 1) + scores).clamp(min=0).masked_fill(same, 0)  # image anchors
    image_cost = (margin - positive.view(1, -1) + scores).clamp(min=0).masked_fill(same, 0)  # caption anchors
    if hardest:
        return caption_cost.max(dim=1).values.sum() + image_cost.max(dim=0).values.sum()
    return caption_cost.sum() + image_cost.sum()
