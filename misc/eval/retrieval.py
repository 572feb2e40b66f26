"""Cross-modal retrieval metrics on the COCO protocols of the paper's retrieval experiments (numpy only, so that
evaluating precomputed embeddings imports no deep-learning library).

Scores are cosine similarities, i.e. dot products of the ℓ2-normalised embeddings. A rank is 1-based and is
computed without sorting: score the positive, then count the candidates scoring *strictly* higher, so a
candidate tied with the positive does not push it down (rank = 1 + count). One score product serves both
directions: a block of image rows against every caption gives each image's captions whole (caption retrieval),
and adds to every caption's count of images above its own (image retrieval). When the whole N × M score matrix
fits in ``max_scores`` (the 5k COCO protocol does: 125 M scores) it is one block, and every positive is compared
with candidates of the very product it comes from. Larger sets are cut into blocks of rows; a caption's positive
then comes from a product of its image's block with that block's captions, and the positive itself is never
counted. The score and comparison buffers are allocated once per evaluation and reused by every block and fold.

Exact float32 ties do occur at scale (a few among 5000 × 25000 random unit vectors); a full numpy argsort, as in
the original release, orders them arbitrarily; here the positive always comes first.

Two protocols, as in the paper: "1k" averages the metrics over consecutive folds of 1000 images (and their
captions); "full" ranks against every image / caption at once (the 5k test set on COCO).
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

DIRECTIONS = ("caption_retrieval", "image_retrieval")
MAX_SCORES = 2**27  # scores per block (512 MiB of float32): the 5k protocol's 125 M fit in one
COMPARE_BYTES = 2**21  # rows compared at once fit in a cache-sized boolean buffer


def caption_owner_default(n_images: int, n_captions: int) -> np.ndarray:
    """Owner image of each caption when captions come in blocks of five: caption j belongs to image j // 5."""
    if n_captions != 5 * n_images:
        raise ValueError(
            f"cannot infer caption owners: {n_captions} captions for {n_images} images is not 5 per image; "
            "pass caption_owner (the image index of each caption) explicitly"
        )
    return np.arange(n_captions) // 5


def _prepare(images, captions, caption_owner) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks shapes and owner indices; returns C-contiguous float32 embeddings and int64 owners.

    Anything ``np.asarray`` reads is accepted, CPU torch tensors included."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    captions = np.ascontiguousarray(captions, dtype=np.float32)
    if images.ndim != 2 or captions.ndim != 2 or images.shape[1] != captions.shape[1]:
        raise ValueError(f"expected images (N, d) and captions (M, d), got {images.shape} and {captions.shape}")
    owner = np.asarray(caption_owner).astype(np.int64, copy=False)
    if owner.shape != (captions.shape[0],):
        raise ValueError(f"caption_owner must have shape ({captions.shape[0]},), got {owner.shape}")
    if owner.size and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise ValueError(f"caption_owner values must lie in [0, {images.shape[0]})")
    counts = np.bincount(owner, minlength=images.shape[0])
    if (counts == 0).any():
        raise ValueError("every image needs at least one caption; images without one include "
                         f"{np.flatnonzero(counts == 0)[:5].tolist()}")
    return images, captions, owner


class Workspace:
    """The reused buffers of :func:`ranks`: one score block and one boolean comparison block."""

    def __init__(self, max_scores: int = MAX_SCORES) -> None:
        self.max_scores = max_scores
        self.scores = np.empty(0, dtype=np.float32)
        self.above = np.empty(0, dtype=bool)

    def block_rows(self, n_images: int, n_captions: int) -> int:
        """Image rows per score block: as many as ``max_scores`` allows, at least one."""
        return max(1, min(n_images, self.max_scores // max(n_captions, 1)))

    def view(self, name: str, rows: int, columns: int) -> np.ndarray:
        """A (rows, columns) view of buffer ``name``, grown (never shrunk) when too small."""
        buffer = getattr(self, name)
        if buffer.size < rows * columns:
            buffer = np.empty(rows * columns, dtype=buffer.dtype)
            setattr(self, name, buffer)
        return buffer[:rows * columns].reshape(rows, columns)


def _block_positives(images: np.ndarray, captions: np.ndarray, owner: np.ndarray, rows: int) -> np.ndarray:
    """(M,) score of each caption with its own image, one product per block of ``rows`` images with only their
    own captions (the scoring blocks' image rows; a BLAS may round the last bit differently for the narrower
    product, which only matters for a negative within that bit of the positive)."""
    positive = np.empty(len(captions), dtype=np.float32)
    for start in range(0, len(images), rows):
        mine = np.flatnonzero((owner >= start) & (owner < start + rows))
        block = images[start:start + rows] @ captions[mine].T  # (rows, |mine|)
        positive[mine] = block[owner[mine] - start, np.arange(len(mine))]
    return positive


def ranks(images, captions, caption_owner, workspace: Workspace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of both directions from one score product: (caption retrieval (N,), image retrieval (M,)).

    Caption retrieval (image query): 1 + number of captions scoring strictly higher than the image's best own
    caption; own captions score at most that maximum, so only negatives are counted. Image retrieval (caption
    query): 1 + number of images scoring strictly higher than the caption's own image. Ties never lower a rank.
    """
    images, captions, owner = _prepare(images, captions, caption_owner)
    n, m = len(images), len(captions)
    work = workspace or Workspace()
    rows = work.block_rows(n, m)
    step = max(1, COMPARE_BYTES // max(m, 1))
    order = np.argsort(owner, kind="stable")  # caption indices grouped by owner
    positive = _block_positives(images, captions, owner, rows) if rows < n else None
    caption_above = np.empty(n, dtype=np.int64)
    image_above = np.zeros(m, dtype=np.int64)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = work.view("scores", stop - start, m)
        np.matmul(images[start:stop], captions.T, out=scores)  # (rows, M)
        mine = order[np.searchsorted(owner[order], start):np.searchsorted(owner[order], stop)]  # grouped by owner
        own = scores[owner[mine] - start, mine]  # each caption's score with its image, in this product
        best = np.maximum.reduceat(own, np.searchsorted(owner[mine], np.arange(start, stop)))  # (rows,)
        if positive is None:
            threshold = np.empty(m, dtype=np.float32)
            threshold[mine] = own
        else:
            threshold = positive
            image_above[mine] -= own > positive[mine]  # the positive itself is never counted
        for first in range(0, stop - start, step):
            block = scores[first:first + step]
            above = work.view("above", len(block), m)
            np.greater(block, best[first:first + step, None], out=above)
            caption_above[start + first:start + first + len(block)] = np.count_nonzero(above, axis=1)
            np.greater(block, threshold, out=above)
            image_above += np.count_nonzero(above, axis=0)
    return 1 + caption_above, 1 + image_above


def recall_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k (percent of queries with rank ≤ k), median rank (numpy.median) and mean rank of 1-based ranks."""
    values = np.asarray(ranks)
    metrics = {f"R@{k}": 100.0 * float(np.mean(values <= k)) for k in ks}
    metrics["medr"] = float(np.median(values))
    metrics["meanr"] = float(np.mean(values))
    return metrics


def _protocol_metrics(images: np.ndarray, captions: np.ndarray, owner: np.ndarray, workspace: Workspace) -> dict:
    """Both directions' metrics and rsum (the six recalls summed) for one set of images and captions."""
    by_caption, by_image = ranks(images, captions, owner, workspace)
    results = {"caption_retrieval": recall_metrics(by_caption), "image_retrieval": recall_metrics(by_image)}
    results["rsum"] = sum(results[d][f"R@{k}"] for d in DIRECTIONS for k in (1, 5, 10))
    return results


def _folds_metrics(images: np.ndarray, captions: np.ndarray, owner: np.ndarray, fold_size: int,
                   workspace: Workspace) -> dict | None:
    """Mean metrics over consecutive folds of fold_size images and their captions; None if no full fold fits."""
    n_folds, leftover = divmod(images.shape[0], fold_size)
    if n_folds == 0:
        logger.warning("1k protocol skipped: %d images, fewer than one fold of %d", images.shape[0], fold_size)
        return None
    if leftover:
        logger.warning("1k protocol: dropping the trailing %d images that do not fill a fold of %d",
                       leftover, fold_size)
    folds = []
    for f in range(n_folds):
        first = f * fold_size
        mine = np.flatnonzero((owner >= first) & (owner < first + fold_size))
        in_a_run = mine[-1] - mine[0] + 1 == len(mine)  # every image has a caption (_prepare), so mine is not empty
        chosen = captions[mine[0]:mine[-1] + 1] if in_a_run else captions[mine]  # a view, not a 48 MB copy at 2400
        folds.append(_protocol_metrics(images[first:first + fold_size], chosen, owner[mine] - first, workspace))
    mean = {d: {key: float(np.mean([r[d][key] for r in folds])) for key in folds[0][d]} for d in DIRECTIONS}
    return {**mean, "rsum": float(np.mean([r["rsum"] for r in folds])), "folds": n_folds}


def evaluate(images, captions, caption_owner=None, protocols: tuple[str, ...] = ("1k", "full"),
             fold_size: int = 1000, max_scores: int = MAX_SCORES) -> dict:
    """Recall@{1,5,10}, medr, meanr in both directions and rsum, for each protocol ("1k" folds and/or "full").

    Inputs are (N, d) and (M, d) arrays (CPU torch tensors too) and the (M,) owner image of each caption
    (default: five consecutive captions per image). The "1k" entry also holds "folds"; it is left out (with a
    warning) when there are fewer than fold_size images. ``max_scores`` bounds the score block in memory.
    """
    unknown = set(protocols) - {"1k", "full"}
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from '1k' and 'full'")
    if caption_owner is None:
        caption_owner = caption_owner_default(len(images), len(captions))
    images, captions, owner = _prepare(images, captions, caption_owner)
    workspace = Workspace(max_scores)
    results = {}
    if "1k" in protocols:
        folds = _folds_metrics(images, captions, owner, fold_size, workspace)
        if folds is not None:
            results["1k"] = folds
    if "full" in protocols:
        results["full"] = _protocol_metrics(images, captions, owner, workspace)
    return results


def format_table(results: dict) -> str:
    """Human-readable table of evaluate()'s results: one row per protocol and direction, then rsum."""
    lines = [f"{'protocol':<14}{'direction':<19}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medr':>7}{'meanr':>8}"]
    for protocol, result in results.items():
        name = f"{protocol} ({result['folds']} folds)" if "folds" in result else protocol
        for direction in DIRECTIONS:
            m = result[direction]
            lines.append(f"{name:<14}{direction.replace('_', ' '):<19}{m['R@1']:7.1f}{m['R@5']:7.1f}"
                         f"{m['R@10']:7.1f}{m['medr']:7.1f}{m['meanr']:8.1f}")
            name = ""
        lines.append(f"{'':<14}{'rsum':<19}{result['rsum']:7.1f}")
    return "\n".join(lines)
