"""Both triplet losses against a brute-force loop over triplets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from misc.loss import triplet_loss


def brute_force(images, captions, margin, hardest, ids):
    total = torch.tensor(0.0, dtype=torch.float64)
    n = len(images)
    s = lambda i, j: float(images[i] @ captions[j])  # noqa: E731 - cosine of unit vectors
    for i in range(n):
        caption_costs, image_costs = [0.0], [0.0]
        for j in range(n):
            if ids[i] == ids[j]:
                continue
            caption_costs.append(max(0.0, margin - s(i, i) + s(i, j)))  # image i, negative caption j
            image_costs.append(max(0.0, margin - s(i, i) + s(j, i)))  # caption i, negative image j
        if hardest:
            total += max(caption_costs) + max(image_costs)
        else:
            total += sum(caption_costs) + sum(image_costs)
    return total


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("with_duplicates", [False, True])
def test_losses_match_brute_force(hardest, with_duplicates):
    torch.manual_seed(0)
    images = F.normalize(torch.randn(9, 6), dim=1)
    captions = F.normalize(images + 0.8 * torch.randn(9, 6), dim=1)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5]) if with_duplicates else torch.arange(9)
    got = triplet_loss(images, captions, margin=0.2, hardest=hardest, ids=ids if with_duplicates else None)
    expected = brute_force(images, captions, 0.2, hardest, ids.tolist())
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0


def test_perfectly_separated_batch_has_zero_loss():
    images = torch.eye(4)
    assert triplet_loss(images, images.clone(), margin=0.2).item() == 0.0
    assert triplet_loss(images, images.clone(), margin=0.2, hardest=False).item() == 0.0
