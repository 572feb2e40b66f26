"""Localization (paper §3.3, eq. 8-9): text-conditioned heatmaps, peaks and the pointing rules (masks, IoU and AP
are in misc/eval/segmentation.py).

Heatmaps. The image path pools the maps G (D', h, w) and projects them with A (d, D') (eq. 1). Applying A at
every position instead gives d maps G' = A·G (eq. 8, a 1x1 convolution without the bias b). For a text
embedding v (d,), K(v) holds the indices of its k largest entries and (eq. 9)

    H = sum_{u in K(v)} |v_u| G'_u = sum_{u in K(v)} |v_u| (A_u · G) = (sum_{u in K(v)} |v_u| A_u) · G.

:func:`heatmaps` uses the last form: one "filter" f = sum_u |v_u| A_u (D',) per text, a weighted sum of only k rows
of A (``F.embedding_bag``, no (k, D') copy), then one D'-long dot product per position, all phrases of all images
in one batched product. Per image with P phrases that is P (k + hw) D' multiply-adds instead of the d hw D' of
forming every G'_u (the original release's order; :func:`heatmaps_full`, the reference the tests compare against).

Coordinates. A pixel p covers the interval [p, p + 1); an h x w map spread over a W x H image gives cell (i, j) the
rectangle [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h), whose centre ((j + .5) W/w, (i + .5) H/h) is where the bilinear
upsampling of :func:`upsample` (``align_corners=False``) puts that sample. A bilinear interpolant is a convex
combination of samples, so its maximum is the largest sample: the peak of a map, in image coordinates, is the
centre of its largest cell (:func:`peak_location`), whatever the upsampling resolution.

Pointing protocols. ``centre`` points at that cell centre and counts a hit when the point is in the box, edges
included. ``original`` follows the original release's pointing game: the cell's top-left corner (col W/w, row H/h),
ties of the arg-max broken in column-major order, and a hit only strictly inside the box (:func:`cell_points`,
:func:`pointing_hits`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from misc.errors import UserError

log = logging.getLogger(__name__)

PAPER_DIM = 2400  # d of the paper's model; the paper's k values are for it
POINTING_K = 180  # eq. 9's k for the pointing game and single heatmaps in the paper (d = 2400)
SEGMENTATION_K = 10  # eq. 9's k for semantic segmentation in the paper (d = 2400)
PAPER_SIZE = 416  # the image side of the paper's localization (a 13 x 13 map from ResNet-152)
POINTING_PROTOCOLS = ("original", "centre")  # where a grid cell points, see cell_points
PANEL_BYTES = 512 * 1024  # a column panel of A read by every text in text_filters: fits one core's L2 cache
KEY_ROWS = 128  # texts whose integer keys top_k makes at a time: 1.2 MB at d = 2400, half per thread (L2 1 MB)


# --------------------------------------------------------------------------- heatmaps (eq. 8-9)

def top_k(texts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K(v) of eq. 9 and the weights |v_u|: texts (..., d) -> (weights (..., k), indices (..., k)).

    The k largest entries, not the largest |v_u|. On the CPU, float32 entries are selected through integer keys in
    the same order (the IEEE 754 bits with the magnitude bits of negatives flipped): ``topk`` compares int32 about
    1.4x faster than float32 there, keys included; the two give the same set up to the order of ties. The keys are
    made :data:`KEY_ROWS` texts at a time in one reused buffer, which ``topk`` reads back from the cache, instead
    of a fresh (..., d) tensor whose pages the kernel may have to supply again on each call (at 2000 texts of
    d = 2400: 20 -> 17 ms).
    """
    if texts.device.type != "cpu" or texts.dtype != torch.float32:
        values, indices = texts.topk(k, dim=-1, sorted=False)
        return values.abs(), indices
    flat = texts.reshape(-1, texts.shape[-1]).contiguous()
    indices = torch.empty(len(flat), k, dtype=torch.long)
    selected = torch.empty(len(flat), k, dtype=torch.int32)  # the keys topk returns; the weights come from texts
    keys = torch.empty(min(KEY_ROWS, len(flat)), flat.shape[1], dtype=torch.int32)
    for first in range(0, len(flat), KEY_ROWS):
        rows = slice(first, first + KEY_ROWS)
        bits = flat[rows].view(torch.int32)
        block = keys[:len(bits)]
        torch.bitwise_right_shift(bits, 31, out=block)
        block.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # order-preserving: -0.0 just below +0.0
        torch.topk(block, k, dim=-1, sorted=False, out=(selected[rows], indices[rows]))
    weights = flat.gather(-1, indices).abs_()
    return weights.reshape(*texts.shape[:-1], k), indices.reshape(*texts.shape[:-1], k)


def text_filters(weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """f = sum_{u in K(v)} |v_u| A_u for each text (eq. 9 folded into one filter): weight A (d, D'), texts (..., d)
    -> (..., D').

    Only the k selected rows of A are read (``F.embedding_bag``); no (..., k, D') tensor is formed. On the CPU the
    columns of A are taken in panels of :data:`PANEL_BYTES`, each read by every text while it sits in the core's
    L2 cache (about 2x faster at d = D' = 2400 than gathering whole rows from memory, bench/bench_heatmaps.py);
    every output element is the same sum in the same order either way.
    """
    weights, indices = top_k(texts.float(), k)
    weights, indices = weights.reshape(-1, k), indices.reshape(-1, k)
    table = weight.float()
    rows, columns = table.shape
    fit = PANEL_BYTES // (rows * table.element_size()) // 16 * 16  # whole 64-byte lines: no row straddles two
    width = columns if table.device.type != "cpu" else max(16, fit)
    panels = [F.embedding_bag(indices, table[:, first:first + width], per_sample_weights=weights, mode="sum")
              for first in range(0, columns, width)]  # (T, width) each
    flat = panels[0] if len(panels) == 1 else torch.cat(panels, dim=1)
    return flat.reshape(*texts.shape[:-1], columns)


def apply_filters(maps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """H = f · G at every position: maps (B, D', h, w) with filters (T, D') shared by all images or (B, T, D')
    per image -> heatmaps (B, T, h, w)."""
    b, channels, h, w = maps.shape
    flat = maps.float().reshape(b, channels, h * w)  # (B, D', hw)
    if filters.dim() == 2:
        out = torch.matmul(filters, flat)  # (T, D') @ (B, D', hw) -> (B, T, hw)
    elif filters.dim() == 3 and filters.shape[0] == b:
        out = torch.bmm(filters, flat)
    else:
        raise ValueError(f"filters {tuple(filters.shape)} must be (T, D') or ({b}, T, D') for maps {tuple(maps.shape)}")
    return out.reshape(b, -1, h, w)


def heatmaps(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 9 by selecting k rows of A first: maps G (B, D', h, w), A (d, D'), texts (T, d) for every image or
    (B, T, d) one set per image -> (B, T, h, w)."""
    return apply_filters(maps, text_filters(weight, texts, k))


def heatmaps_full(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """Reference for :func:`heatmaps`, the original release's order: all d maps G' = A·G (eq. 8) as one dense
    product per image, then the |v_u|-weighted sum of k of them."""
    b, channels, h, w = maps.shape
    projected = torch.matmul(weight.float(), maps.float().reshape(b, channels, h * w)).reshape(b, -1, h, w)  # G'
    weights, indices = top_k(texts.float(), k)  # (T, k) or (B, T, k)
    if texts.dim() == 2:
        picked = projected[:, indices]  # (B, T, k, h, w)
    else:
        picked = projected[torch.arange(len(maps), device=maps.device)[:, None, None], indices]  # (B, T, k, h, w)
    return (weights[..., None, None] * picked).sum(dim=-3)


def default_k(dim: int, paper_k: int) -> int:
    """The paper's k for d = 2400, scaled as k/2400 · d (at least 1) for smaller embeddings."""
    return paper_k if dim >= PAPER_DIM else max(1, round(paper_k * dim / PAPER_DIM))


def choose_k(requested: int | None, dim: int, paper_k: int) -> int:
    """--k as given (clipped to d), else :func:`default_k`; says which it used."""
    if requested is None:
        k = default_k(dim, paper_k)
        if dim < PAPER_DIM:
            log.info("k = %d: the paper's k = %d of d = %d scaled to this model's d = %d (pass --k to change)",
                     k, paper_k, PAPER_DIM, dim)
        return k
    if requested < 1:
        raise UserError(f"--k must be at least 1, got {requested}")
    if requested > dim:
        log.warning("--k %d is more than the embedding size d = %d: using k = %d", requested, dim, dim)
    return min(requested, dim)


# --------------------------------------------------------------------------- upsampling and peaks

def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of maps (..., h, w) to (..., height, width)."""
    lead = maps.shape[:-2]
    flat = maps.float().reshape(-1, 1, *maps.shape[-2:])
    return F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False).reshape(
        *lead, height, width)


def peak_cells(maps: torch.Tensor, column_major: bool = False) -> torch.Tensor:
    """(row, col) of the largest cell of maps (..., h, w) -> (..., 2) long. Ties go to the first cell in row-major
    order, or with ``column_major`` in column-major order (the original's argmax of the transposed map)."""
    h, w = maps.shape[-2:]
    if column_major:
        index = maps.transpose(-1, -2).reshape(*maps.shape[:-2], h * w).argmax(dim=-1)
        return torch.stack([index % h, index // h], dim=-1)
    index = maps.reshape(*maps.shape[:-2], h * w).argmax(dim=-1)
    return torch.stack([index // w, index % w], dim=-1)


def cell_points(cells: torch.Tensor, grid: tuple[int, int], width: float, height: float,
                protocol: str = "centre") -> torch.Tensor:
    """Cells (..., 2) as (row, col) of an h x w grid spread over a width x height image -> (..., 2) points (x, y):
    the cell's centre ((col + .5) W/w, (row + .5) H/h) for ``centre``, its top-left corner (col W/w, row H/h) for
    ``original`` (the original release's pointing game)."""
    if protocol not in POINTING_PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: one of {', '.join(POINTING_PROTOCOLS)}")
    offset = 0.5 if protocol == "centre" else 0.0
    h, w = grid
    rows, cols = cells[..., 0].double(), cells[..., 1].double()
    return torch.stack([(cols + offset) * (width / w), (rows + offset) * (height / h)], dim=-1)


def peak_location(maps: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Peak of maps (..., h, w) spread over a width x height image -> (..., 2) as (x, y) in continuous pixel
    coordinates: the centre of the largest cell (first in row-major order on ties), see the module docstring."""
    return cell_points(peak_cells(maps), tuple(maps.shape[-2:]), width, height).float()


# --------------------------------------------------------------------------- pointing game

def scale_boxes(boxes: torch.Tensor, source: tuple[float, float], target: tuple[float, float]) -> torch.Tensor:
    """Boxes (N, 4) as (x, y, width, height) in a source (W, H) frame -> the same boxes in a target (W', H') frame."""
    sx, sy = target[0] / source[0], target[1] / source[1]
    return boxes.float() * torch.tensor([sx, sy, sx, sy])


def pointing_hits(points: torch.Tensor, boxes: torch.Tensor, tolerance: float = 0.0,
                  strict: bool = False) -> torch.Tensor:
    """Whether each point (N, 2) as (x, y) lies in its box (N, 4) as (x, y, width, height) -> (N,) bool.

    Inside means bx <= x <= bx + w and by <= y <= by + h, or with ``strict`` bx < x < bx + w and by < y < by + h
    (the original release's rule). With ``tolerance`` > 0 a point within that Euclidean distance of the rectangle
    also counts (the TorchRay convention).
    """
    points, boxes = points.double(), boxes.double()
    low, high = boxes[:, :2], boxes[:, :2] + boxes[:, 2:]
    inside = ((points > low) & (points < high)) if strict else ((points >= low) & (points <= high))
    outside = torch.clamp(torch.maximum(low - points, points - high), min=0)  # (N, 2) per-axis distance
    near = outside.norm(dim=1) <= tolerance if tolerance > 0 else torch.zeros(len(points), dtype=torch.bool)
    return inside.all(dim=1) | near


def phrase_hit(point: torch.Tensor, boxes: torch.Tensor, tolerance: float = 0.0, strict: bool = False) -> bool:
    """Whether a point (2,) as (x, y) hits ANY of a phrase's boxes (N, 4) as (x, y, width, height), under the
    rule of :func:`pointing_hits` (Flickr30K Entities: any box of the phrase's coreference chain)."""
    return bool(pointing_hits(point.reshape(1, 2).expand(len(boxes), 2), boxes, tolerance, strict).any())
