"""Both triplet losses against a brute-force loop over triplets; the N-pair and sampled triplet losses by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from misc import config
from misc.train.losses import LOSSES, build_loss, impostors, npair_loss, ranking_loss, sampled_triplet_loss


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
    got = ranking_loss(images @ captions.t(), margin=0.2, hardest=hardest, ids=ids if with_duplicates else None)
    expected = brute_force(images, captions, 0.2, hardest, ids.tolist())
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0


def test_perfectly_separated_batch_has_zero_loss():
    images = torch.eye(4)
    assert ranking_loss(images @ images.t(), margin=0.2).item() == 0.0
    assert ranking_loss(images @ images.t(), margin=0.2, hardest=False).item() == 0.0


def test_npair_loss_is_cross_entropy_both_ways_by_hand():
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.5, -0.5, 0.5]])
    log_sum_exp = lambda values: math.log(sum(math.exp(v) for v in values))  # noqa: E731
    rows = [log_sum_exp(scores[i].tolist()) - float(scores[i, i]) for i in range(3)]  # image i ranks the captions
    columns = [log_sum_exp(scores[:, i].tolist()) - float(scores[i, i]) for i in range(3)]  # caption i, the images
    assert npair_loss(scores).item() == pytest.approx(sum(rows) / 3 + sum(columns) / 3, rel=1e-6)
    # pairs 1 and 2 of the same image: neither is the other's negative
    ids = torch.tensor([0, 1, 1])
    rows = [log_sum_exp([2.0, 0.5, -1.0]) - 2.0, log_sum_exp([0.0, 1.0]) - 1.0, log_sum_exp([1.5, 0.5]) - 0.5]
    columns = [log_sum_exp([2.0, 0.0, 1.5]) - 2.0, log_sum_exp([0.5, 1.0]) - 1.0, log_sum_exp([-1.0, 0.5]) - 0.5]
    assert npair_loss(scores, ids).item() == pytest.approx(sum(rows) / 3 + sum(columns) / 3, rel=1e-6)


def test_sampled_triplet_loss_uses_one_impostor_of_another_image_per_anchor():
    torch.manual_seed(0)
    scores, ids = torch.randn(6, 6), torch.tensor([0, 0, 1, 2, 2, 3])
    draws = torch.Generator().manual_seed(9)
    got = sampled_triplet_loss(scores, margin=0.1, ids=ids, generator=torch.Generator().manual_seed(9))
    same = ids[:, None] == ids[None, :]
    caption, image = impostors(same, draws), impostors(same, draws)
    assert not bool(same[torch.arange(6), caption].any()) and not bool(same[torch.arange(6), image].any())
    expected = sum(max(0.0, 0.1 - scores[i, i] + scores[i, caption[i]]) +
                   max(0.0, 0.1 - scores[i, i] + scores[image[i], i]) for i in range(6)) / 6
    assert got.item() == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("name", ["hard", "sum", "npair", "triplet"])
def test_every_configured_loss_is_built_with_finite_gradients(name):
    scores = torch.randn(5, 5, requires_grad=True)
    loss = build_loss(name, margin=0.2)(scores, ids=None)
    loss.backward()
    assert loss.item() >= 0 and bool(torch.isfinite(scores.grad).all())
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge", 0.2)



def test_the_registry_is_the_configs_choice_of_losses_each_with_its_own_tag():
    assert tuple(LOSSES) == config.LOSSES  # config checks train.loss without importing torch
    assert all(name == loss.name for name, loss in LOSSES.items())
    assert len({loss.tag for loss in LOSSES.values()}) == len({loss.description for loss in LOSSES.values()}) == 4
