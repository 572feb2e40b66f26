"""Retrieval ranks and metrics against a brute-force sort, on random, tied and shuffled data."""
import logging

import numpy as np
import pytest
import torch

from misc.eval.retrieval import Workspace, caption_owner_default, evaluate, format_table, ranks, recall_metrics


def unit(n: int, d: int, seed: int) -> np.ndarray:
    """n random float32 unit vectors of size d."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shuffled(captions: np.ndarray, owner: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same captions and owners in a random order, so an image's captions are not contiguous."""
    perm = np.random.default_rng(seed).permutation(len(owner))
    return captions[perm], owner[perm]


def rank_captions(images, captions, owner, max_scores: int = 10**9) -> np.ndarray:
    return ranks(images, captions, owner, Workspace(max_scores))[0]


def rank_images(images, captions, owner, max_scores: int = 10**9) -> np.ndarray:
    return ranks(images, captions, owner, Workspace(max_scores))[1]


def two_product_ranks(images, captions, owner) -> tuple[np.ndarray, np.ndarray]:
    """The previous rule: each direction its own product, its positive read from that product."""
    by_image = images @ captions.T  # (N, M)
    best = np.array([by_image[i, owner == i].max() for i in range(len(images))])
    by_caption = captions @ images.T  # (M, N)
    positive = by_caption[np.arange(len(captions)), owner]
    return 1 + (by_image > best[:, None]).sum(1), 1 + (by_caption > positive[:, None]).sum(1)


def brute_ranks(scores: np.ndarray, positive: np.ndarray, positive_first: bool = True) -> np.ndarray:
    """1-based rank of each row's first positive after a full sort by decreasing score.

    Equal scores keep the positive ahead of the negatives (positive_first), the convention of misc.eval.retrieval.
    """
    ranks = []
    for row, pos in zip(scores, positive):
        tie_key = ~pos if positive_first else pos
        order = np.lexsort((tie_key, -row))
        ranks.append(1 + np.flatnonzero(pos[order])[0])
    return np.array(ranks)


def brute_both(images: np.ndarray, captions: np.ndarray, owner: np.ndarray, positive_first: bool = True):
    """Brute-force (caption retrieval ranks, image retrieval ranks)."""
    scores = images @ captions.T  # (N, M)
    is_pos = owner[None, :] == np.arange(len(images))[:, None]  # (N, M)
    return brute_ranks(scores, is_pos, positive_first), brute_ranks(scores.T, is_pos.T, positive_first)


def tied_data(n: int, m: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer embeddings: every score is exact, and many scores are equal."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1, 2, (n, d)).astype(np.float32), rng.integers(-1, 2, (m, d)).astype(np.float32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_match_brute_force_on_random_data(shuffle):
    images, captions, owner = unit(60, 16, 0), unit(300, 16, 1), caption_owner_default(60, 300)
    if shuffle:
        captions, owner = shuffled(captions, owner, 2)
    expected_cap, expected_img = brute_both(images, captions, owner)
    got_cap, got_img = ranks(images, captions, owner)
    assert got_cap.dtype == got_img.dtype == np.int64
    np.testing.assert_array_equal(got_cap, expected_cap)
    np.testing.assert_array_equal(got_img, expected_img)
    full = evaluate(images, captions, owner, protocols=("full",))["full"]
    assert full["caption_retrieval"] == recall_metrics(expected_cap)
    assert full["image_retrieval"] == recall_metrics(expected_img)
    # CPU torch tensors are read as they are
    assert evaluate(torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(owner),
                    protocols=("full",))["full"] == full


def test_ties_do_not_push_the_positive_down():
    images, captions = tied_data(40, 200, 3, 3)
    captions, owner = shuffled(captions, caption_owner_default(40, 200), 4)
    expected_cap, expected_img = brute_both(images, captions, owner)
    np.testing.assert_array_equal(rank_captions(images, captions, owner), expected_cap)
    np.testing.assert_array_equal(rank_images(images, captions, owner), expected_img)
    # the data must really contain ties that matter: the opposite convention gives other ranks
    last_cap, last_img = brute_both(images, captions, owner, positive_first=False)
    assert (last_cap != expected_cap).any() and (last_img != expected_img).any()


@pytest.mark.parametrize("max_scores", [1, 7 * 250, 10**6])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_product_equals_two_products_for_any_block(max_scores, tied):
    """One score product for both directions, whole or in blocks of rows, ranks as one product per direction
    does, exact ties included (tied data: small-integer vectors, every score exact)."""
    images, captions = tied_data(30, 150, 3, 8) if tied else (unit(50, 8, 5), unit(250, 8, 6))
    captions, owner = shuffled(captions, caption_owner_default(len(images), len(captions)), 7)
    expected_cap, expected_img = two_product_ranks(images, captions, owner)
    got_cap, got_img = ranks(images, captions, owner, Workspace(max_scores))
    np.testing.assert_array_equal(got_cap, expected_cap)
    np.testing.assert_array_equal(got_img, expected_img)
    if tied:  # ties that matter are present: counting ties as higher would give other ranks
        scores = images @ captions.T
        positive = scores[owner, np.arange(len(owner))]
        assert ((scores >= positive).sum(0) != expected_img).any()  # the positive counts itself: ties-last rank


def test_workspace_is_reused_across_folds():
    images, captions = unit(2000, 8, 20), unit(10000, 8, 21)
    workspace = Workspace()
    ranks(images[:1000], captions[:5000], caption_owner_default(1000, 5000), workspace)
    buffer = workspace.scores
    ranks(images[1000:], captions[5000:], caption_owner_default(1000, 5000), workspace)
    assert workspace.scores is buffer and buffer.size == 1000 * 5000


def test_perfect_embedding_ranks_everything_first():
    images = unit(100, 32, 9)
    owner = caption_owner_default(100, 500)
    full = evaluate(images, images[owner], protocols=("full",))["full"]
    for direction in ("caption_retrieval", "image_retrieval"):
        assert full[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert full["rsum"] == 600.0


def test_hand_made_two_images_ten_captions():
    # image 0 scores a caption by its x, image 1 by its y; captions 0-4 belong to image 0, 5-9 to image 1
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    captions = np.array([[0.5, 0.9], [0.4, 0.8], [0.3, 0.1], [0.2, 0.2], [0.1, 0.3],
                             [0.9, 0.05], [0.8, 0.7], [0.7, 0.6], [0.6, 0.5], [0.05, 0.4]], dtype=np.float32)
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


@pytest.mark.parametrize("shuffle", [False, True])  # a fold's captions in one run (taken as a view) or scattered
def test_1k_protocol_is_the_mean_of_consecutive_folds(caplog, shuffle):
    images, captions = unit(2500, 8, 10), unit(12500, 8, 11)
    owner = caption_owner_default(2500, 12500)
    if shuffle:
        captions, owner = shuffled(captions, owner, 12)
    with caplog.at_level(logging.WARNING, logger="misc.eval.retrieval"):
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
    with caplog.at_level(logging.WARNING, logger="misc.eval.retrieval"):
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
        ranks(unit(3, 4, 17), unit(4, 4, 18), np.array([0, 0, 2, 2]))
