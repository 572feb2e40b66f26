"""Retrieval ranks and metrics against a brute-force sort, on random, tied and shuffled data."""
import logging

import numpy as np
import pytest
import torch

from misc.retrieval import (caption_owner_default, evaluate, format_table, rank_captions, rank_images,
                            recall_metrics)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    """n random unit vectors of size d."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def shuffled(captions: torch.Tensor, owner: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same captions and owners in a random order, so an image's captions are not contiguous."""
    perm = torch.randperm(len(owner), generator=torch.Generator().manual_seed(seed))
    return captions[perm], owner[perm]


def brute_ranks(scores: np.ndarray, positive: np.ndarray, positive_first: bool = True) -> np.ndarray:
    """1-based rank of each row's first positive after a full sort by decreasing score.

    Equal scores keep the positive ahead of the negatives (positive_first), the convention of misc.retrieval.
    """
    ranks = []
    for row, pos in zip(scores, positive):
        tie_key = ~pos if positive_first else pos
        order = np.lexsort((tie_key, -row))
        ranks.append(1 + np.flatnonzero(pos[order])[0])
    return np.array(ranks)


def brute_both(images: torch.Tensor, captions: torch.Tensor, owner: torch.Tensor, positive_first: bool = True):
    """Brute-force (caption retrieval ranks, image retrieval ranks)."""
    scores = (images @ captions.T).numpy()  # (N, M)
    owner = owner.numpy()
    is_pos = owner[None, :] == np.arange(len(images))[:, None]  # (N, M)
    return brute_ranks(scores, is_pos, positive_first), brute_ranks(scores.T, is_pos.T, positive_first)


def tied_data(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer embeddings: every score is exact, and many scores are equal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, d), generator=g).float(), torch.randint(-1, 2, (m, d), generator=g).float()


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_match_brute_force_on_random_data(shuffle):
    images, captions, owner = unit(60, 16, 0), unit(300, 16, 1), caption_owner_default(60, 300)
    if shuffle:
        captions, owner = shuffled(captions, owner, 2)
    expected_cap, expected_img = brute_both(images, captions, owner)
    got_cap, got_img = rank_captions(images, captions, owner), rank_images(images, captions, owner)
    assert got_cap.dtype == got_img.dtype == torch.long
    np.testing.assert_array_equal(got_cap.numpy(), expected_cap)
    np.testing.assert_array_equal(got_img.numpy(), expected_img)
    full = evaluate(images, captions, owner, protocols=("full",))["full"]
    assert full["caption_retrieval"] == recall_metrics(torch.from_numpy(expected_cap))
    assert full["image_retrieval"] == recall_metrics(torch.from_numpy(expected_img))


def test_ties_do_not_push_the_positive_down():
    images, captions = tied_data(40, 200, 3, 3)
    captions, owner = shuffled(captions, caption_owner_default(40, 200), 4)
    expected_cap, expected_img = brute_both(images, captions, owner)
    np.testing.assert_array_equal(rank_captions(images, captions, owner).numpy(), expected_cap)
    np.testing.assert_array_equal(rank_images(images, captions, owner).numpy(), expected_img)
    # the data must really contain ties that matter: the opposite convention gives other ranks
    last_cap, last_img = brute_both(images, captions, owner, positive_first=False)
    assert (last_cap != expected_cap).any() and (last_img != expected_img).any()


@pytest.mark.parametrize("chunk", [1, 7, 10**6])
def test_chunk_size_does_not_change_ranks(chunk):
    images, captions = unit(50, 8, 5), unit(250, 8, 6)
    captions, owner = shuffled(captions, caption_owner_default(50, 250), 7)
    torch.testing.assert_close(rank_captions(images, captions, owner, chunk), rank_captions(images, captions, owner))
    torch.testing.assert_close(rank_images(images, captions, owner, chunk), rank_images(images, captions, owner))
    tied_images, tied_captions = tied_data(30, 150, 3, 8)
    tied_owner = caption_owner_default(30, 150)
    torch.testing.assert_close(rank_captions(tied_images, tied_captions, tied_owner, chunk),
                               rank_captions(tied_images, tied_captions, tied_owner))
    torch.testing.assert_close(rank_images(tied_images, tied_captions, tied_owner, chunk),
                               rank_images(tied_images, tied_captions, tied_owner))


def test_perfect_embedding_ranks_everything_first():
    images = unit(100, 32, 9)
    owner = caption_owner_default(100, 500)
    full = evaluate(images, images[owner], protocols=("full",))["full"]
    for direction in ("caption_retrieval", "image_retrieval"):
        assert full[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert full["rsum"] == 600.0


def test_hand_made_two_images_ten_captions():
    # image 0 scores a caption by its x, image 1 by its y; captions 0-4 belong to image 0, 5-9 to image 1
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    captions = torch.tensor([[0.5, 0.9], [0.4, 0.8], [0.3, 0.1], [0.2, 0.2], [0.1, 0.3],
                             [0.9, 0.05], [0.8, 0.7], [0.7, 0.6], [0.6, 0.5], [0.05, 0.4]])
    owner = caption_owner_default(2, 10)
    # image 0: best own x is 0.5, beaten by 0.9 0.8 0.7 0.6; image 1: best own y is 0.7, beaten by 0.9 0.8
    assert rank_captions(images, captions, owner).tolist() == [5, 3]
    # caption 3 ties (0.2, 0.2): its image stays first
    assert rank_images(images, captions, owner).tolist() == [2, 2, 1, 1, 2, 2, 2, 2, 2, 1]
    full = evaluate(images, captions, protocols=("full",))["full"]
    assert full["caption_retrieval"] == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "medr": 4.0, "meanr": 4.0}
    assert full["image_retrieval"] == pytest.approx({"R@1": 30.0, "R@5": 100.0, "R@10": 100.0, "medr": 2.0,
                                                     "meanr": 1.7})
    assert full["rsum"] == pytest.approx(430.0)


def test_1k_protocol_is_the_mean_of_consecutive_folds(caplog):
    images, captions = unit(2500, 8, 10), unit(12500, 8, 11)
    captions, owner = shuffled(captions, caption_owner_default(2500, 12500), 12)
    with caplog.at_level(logging.WARNING, logger="misc.retrieval"):
        results = evaluate(images, captions, owner)
    assert results["1k"]["folds"] == 2
    assert any("500" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    folds = []
    for f in range(2):
        mine = (owner >= 1000 * f) & (owner < 1000 * (f + 1))
        folds.append(evaluate(images[1000 * f:1000 * (f + 1)], captions[mine], owner[mine] - 1000 * f,
                              protocols=("full",))["full"])
    for direction in ("caption_retrieval", "image_retrieval"):
        for key, value in results["1k"][direction].items():
            assert value == pytest.approx((folds[0][direction][key] + folds[1][direction][key]) / 2)
    assert results["1k"]["rsum"] == pytest.approx((folds[0]["rsum"] + folds[1]["rsum"]) / 2)
    assert results["full"] == evaluate(images, captions, owner, protocols=("full",))["full"]
    assert "1k" in format_table(results) and "rsum" in format_table(results)


def test_1k_protocol_skipped_below_one_fold(caplog):
    images = unit(200, 8, 13)
    with caplog.at_level(logging.WARNING, logger="misc.retrieval"):
        results = evaluate(images, unit(1000, 8, 14))
    assert set(results) == {"full"}
    assert any("1k" in r.getMessage() for r in caplog.records)


def test_caption_owner_default():
    assert caption_owner_default(2, 10).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="5 per image"):
        caption_owner_default(3, 14)
    with pytest.raises(ValueError, match="5 per image"):
        evaluate(unit(3, 4, 15), unit(16, 4, 16))


def test_image_without_caption_is_rejected():
    with pytest.raises(ValueError, match="at least one caption"):
        rank_captions(unit(3, 4, 17), unit(4, 4, 18), torch.tensor([0, 0, 2, 2]))
