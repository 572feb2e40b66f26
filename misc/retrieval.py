"""Cross-modal retrieval metrics on the COCO protocols of the paper's retrieval experiments.

Scores are cosine similarities, i.e. dot products of the ℓ2-normalised embeddings. A rank is 1-based and is
computed without sorting: score the positive, then count the candidates scoring *strictly* higher, so a
candidate tied with the positive does not push it down (rank = 1 + count). Queries are processed in chunks,
so memory holds one (chunk × candidates) score block at a time, never the whole N × M matrix. A query's
positive and candidates come from the same block, so the comparison is consistent; the last bit of a float32
GEMM may depend on the block shape or BLAS, so candidates within rounding of the positive may rank differently
across chunk sizes or libraries. Exact float32 ties do occur at scale (a few among 5000 × 25000 random unit
vectors); a full numpy argsort, as in the original release, orders them arbitrarily.

Two protocols, as in the paper: "1k" averages the metrics over consecutive folds of 1000 images (and their
captions); "full" ranks against every image / caption at once (the 5k test set on COCO).
"""
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

DIRECTIONS = ("caption_retrieval", "image_retrieval")


def caption_owner_default(n_images: int, n_captions: int) -> torch.Tensor:
    """Owner image of each caption when captions come in blocks of five: caption j belongs to image j // 5."""
    if n_captions != 5 * n_images:
        raise ValueError(
            f"cannot infer caption owners: {n_captions} captions for {n_images} images is not 5 per image; "
            "pass caption_owner (the image index of each caption) explicitly"
        )
    return torch.arange(n_captions) // 5


def _prepare(
    images: torch.Tensor, captions: torch.Tensor, caption_owner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks shapes and owner indices; returns float32 embeddings and long owners, all on the images' device."""
    if images.dim() != 2 or captions.dim() != 2 or images.shape[1] != captions.shape[1]:
        raise ValueError(f"expected images (N, d) and captions (M, d), got {tuple(images.shape)} and "
                         f"{tuple(captions.shape)}")
    owner = caption_owner.to(device=images.device, dtype=torch.long)
    if owner.shape != (captions.shape[0],):
        raise ValueError(f"caption_owner must have shape ({captions.shape[0]},), got {tuple(owner.shape)}")
    if owner.numel() and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise ValueError(f"caption_owner values must lie in [0, {images.shape[0]})")
    return images.float(), captions.to(device=images.device, dtype=torch.float32), owner


def _positives_per_image(owner: torch.Tensor, n_images: int) -> torch.Tensor:
    """(N, P) caption indices of each image's captions, P = most captions of one image.

    Rows with fewer than P captions repeat one of their own captions, which leaves a row maximum unchanged.
    """
    counts = torch.bincount(owner, minlength=n_images)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one caption; images without one include {missing}")
    order = torch.argsort(owner, stable=True)  # caption indices grouped by owner
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(int(counts.max()), device=owner.device)
    return order[starts[:, None] + torch.minimum(slot[None, :], counts[:, None] - 1)]


@torch.no_grad()
def rank_captions(
    images: torch.Tensor, captions: torch.Tensor, caption_owner: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Caption retrieval (image query): (N,) 1-based rank of each image's best-scoring own caption.

    rank = 1 + number of captions scoring strictly higher than the image's best positive; since every positive
    scores at most that maximum, only negatives are counted. Ties with the positive do not lower the rank.
    """
    images, captions, owner = _prepare(images, captions, caption_owner)
    positives = _positives_per_image(owner, images.shape[0])
    ranks = []
    for start in range(0, images.shape[0], chunk):
        scores = images[start:start + chunk] @ captions.T  # (c, M)
        best = scores.gather(1, positives[start:start + chunk]).amax(1, keepdim=True)  # (c, 1)
        ranks.append(1 + (scores > best).sum(1))
    return torch.cat(ranks)


@torch.no_grad()
def rank_images(
    images: torch.Tensor, captions: torch.Tensor, caption_owner: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Image retrieval (caption query): (M,) 1-based rank of each caption's own image among all N images.

    rank = 1 + number of images scoring strictly higher than the caption's image; ties do not lower the rank.
    """
    images, captions, owner = _prepare(images, captions, caption_owner)
    ranks = []
    for start in range(0, captions.shape[0], chunk):
        scores = captions[start:start + chunk] @ images.T  # (c, N)
        positive = scores.gather(1, owner[start:start + chunk, None])  # (c, 1), same GEMM values as the row
        ranks.append(1 + (scores > positive).sum(1))
    return torch.cat(ranks)


def recall_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k (percent of queries with rank ≤ k), median rank (numpy.median) and mean rank of 1-based ranks."""
    values = ranks.detach().cpu().numpy()
    metrics = {f"R@{k}": 100.0 * float(np.mean(values <= k)) for k in ks}
    metrics["medr"] = float(np.median(values))
    metrics["meanr"] = float(np.mean(values))
    return metrics


def _protocol_metrics(
    images: torch.Tensor, captions: torch.Tensor, owner: torch.Tensor, chunk: int
) -> dict:
    """Both directions' metrics and rsum (the six recalls summed) for one set of images and captions."""
    results = {
        "caption_retrieval": recall_metrics(rank_captions(images, captions, owner, chunk)),
        "image_retrieval": recall_metrics(rank_images(images, captions, owner, chunk)),
    }
    results["rsum"] = sum(results[d][f"R@{k}"] for d in DIRECTIONS for k in (1, 5, 10))
    return results


def _folds_metrics(
    images: torch.Tensor, captions: torch.Tensor, owner: torch.Tensor, fold_size: int, chunk: int
) -> dict | None:
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
        mine = (owner >= first) & (owner < first + fold_size)
        folds.append(_protocol_metrics(images[first:first + fold_size], captions[mine], owner[mine] - first, chunk))
    mean = {d: {key: float(np.mean([r[d][key] for r in folds])) for key in folds[0][d]} for d in DIRECTIONS}
    return {**mean, "rsum": float(np.mean([r["rsum"] for r in folds])), "folds": n_folds}


def evaluate(
    images: torch.Tensor,
    captions: torch.Tensor,
    caption_owner: torch.Tensor | None = None,
    protocols: tuple[str, ...] = ("1k", "full"),
    fold_size: int = 1000,
    chunk: int = 1024,
) -> dict:
    """Recall@{1,5,10}, medr, meanr in both directions and rsum, for each protocol ("1k" folds and/or "full").

    The "1k" entry also holds "folds"; it is left out (with a warning) when there are fewer than fold_size images.
    """
    unknown = set(protocols) - {"1k", "full"}
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from '1k' and 'full'")
    if caption_owner is None:
        caption_owner = caption_owner_default(images.shape[0], captions.shape[0])
    images, captions, owner = _prepare(images, captions, caption_owner)
    results = {}
    if "1k" in protocols:
        folds = _folds_metrics(images, captions, owner, fold_size, chunk)
        if folds is not None:
            results["1k"] = folds
    if "full" in protocols:
        results["full"] = _protocol_metrics(images, captions, owner, chunk)
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
