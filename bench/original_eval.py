"""The original release's retrieval evaluation rule, re-implemented for the benchmarks (never used by the project).

    python bench/original_eval.py features.npz [--protocol 1k|full]

Reads the arrays ``images`` (N, d) and ``captions`` (5N, d, caption j of image j // 5) that
``eval_retrieval.py --features`` reads, and applies the rule of the original's misc/evaluation.py in numpy, as it
did: cosine scores (the dot products divided by the outer product of the row norms), one full descending
``argsort`` of every score row in each direction, and the 0-based position of the first positive in that order
as the rank. Recall@k counts ranks < k. "1k" is the mean of every metric over consecutive folds of 1000 images
(the original drops a trailing partial fold), "full" ranks against every image at once.

Its medians are of 0-based ranks, as the original printed them; ``eval_retrieval.py`` reports 1-based ranks, so
its medr is this one plus 1. Only numpy is imported: the rule needs nothing else.
"""
from __future__ import annotations

import argparse

import numpy as np

KS = (1, 5, 10)
FOLD = 1000  # images per fold of the 1k protocol


def cosine_scores(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """(N, M) cosine similarities: the dot products divided by the products of the row norms."""
    norms = np.linalg.norm(images, axis=1)[:, None] * np.linalg.norm(captions, axis=1)[None, :]
    return np.dot(images, captions.T) / norms


def caption_ranks(scores: np.ndarray) -> np.ndarray:
    """Image queries: 0-based position of the first of captions 5i..5i+4 in row i's descending order."""
    orders = np.argsort(scores, axis=1)[:, ::-1]
    return np.array([np.flatnonzero(np.isin(order, np.arange(5 * i, 5 * i + 5)))[0] for i, order in enumerate(orders)])


def image_ranks(scores: np.ndarray) -> np.ndarray:
    """Caption queries: 0-based position of image j // 5 in column j's descending order."""
    orders = np.argsort(scores.T, axis=1)[:, ::-1]
    return np.array([np.flatnonzero(order == j // 5)[0] for j, order in enumerate(orders)])


def recalls(ranks: np.ndarray) -> list[float]:
    """Percent of 0-based ranks below each k."""
    return [100.0 * float(np.sum(ranks < k)) / len(ranks) for k in KS]


def rule(images: np.ndarray, captions: np.ndarray) -> dict[str, list[float]]:
    """Both directions on one set: R@1/5/10 and the median 0-based rank, from full descending sorts."""
    scores = cosine_scores(images, captions)  # (N, 5N)
    by_caption, by_image = caption_ranks(scores), image_ranks(scores)
    return {"caption_retrieval": [*recalls(by_caption), float(np.median(by_caption))],
            "image_retrieval": [*recalls(by_image), float(np.median(by_image))]}


def evaluate(images: np.ndarray, captions: np.ndarray, protocol: str) -> dict[str, list[float]]:
    """The rule on every fold of 1000 images (mean of the folds' metrics), or once on the whole set."""
    if protocol == "full":
        return rule(images, captions)
    folds = [rule(images[f:f + FOLD], captions[5 * f:5 * (f + FOLD)])
             for f in range(0, len(images) - FOLD + 1, FOLD)]
    return {d: list(np.mean([fold[d] for fold in folds], axis=0)) for d in folds[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features", help=".npz with images (N, d) and captions (5N, d)")
    parser.add_argument("--protocol", choices=["1k", "full"], default="1k")
    args = parser.parse_args(argv)
    with np.load(args.features) as data:
        images, captions = data["images"], data["captions"]
    results = evaluate(images, captions, args.protocol)
    for direction, values in results.items():
        print(f"{direction}: R@1/5/10 {values[0]:.2f} {values[1]:.2f} {values[2]:.2f}, medr (0-based) {values[3]}")


if __name__ == "__main__":
    main()
