"""Localization (paper §3.3): where a heatmap points, and the pointing rules; the heatmaps themselves (eq. 8-9) are
in models/heatmaps.py, masks, IoU and AP in misc/eval/segmentation.py.

Coordinates. A pixel p covers the interval [p, p + 1); an h x w map spread over a W x H image gives cell (i, j) the
rectangle [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h), whose centre ((j + .5) W/w, (i + .5) H/h) is where the bilinear
upsampling of :func:`upsample` (``align_corners=False``) puts that sample. A bilinear interpolant is a convex
combination of samples, so its maximum is the largest sample: the peak of a map, in image coordinates, is the
centre of its largest cell (:func:`peak_location`), whatever the upsampling resolution.

Pointing protocols. ``centre`` points at that cell centre and counts a hit when the point is in the box, edges
included. ``original`` follows the original release's pointing game: the cell's top-left corner (col W/w, row H/h),
ties of the arg-max broken in column-major order, and a hit only strictly inside the box (:func:`cell_points`,
:func:`pointing_hits`). ``das2019`` follows Das et al.'s code (Flickr30K Entities only): the map bilinearly
resized to the input size, the arg-max pixel's centre, every ground-truth box its own trial, the fraction of hits
per caption, then the mean over captions (:func:`pixel_points`, :func:`caption_accuracy`). Their code compares the
arg-max's row with the box's x range and its column with the y range; ``swap_xy`` reproduces that swap.
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
PAPER_SIZE = 416  # the image side of the paper's localization: its test size 400 made a whole 13 x 13 grid


def localization_side(test_size: int, stride: int) -> int:
    """The image side heatmaps are made at by default: the checkpoint's test size rounded up to a whole number of
    the trunk's cells (the paper's 400 at stride 32 gives its 416, a 13 x 13 map; Das et al.'s 224 at stride 16 a
    14 x 14 one; the demo's 96 a 3 x 3 one)."""
    return -(-test_size // stride) * stride
POINTING_PROTOCOLS = ("original", "centre")  # where a grid cell points, see cell_points
DAS2019 = "das2019"  # Das et al.'s pixel rule and per-caption score, see pixel_points and caption_accuracy


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


def pixel_points(maps: torch.Tensor, size: int, swap_xy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Das et al.'s point of maps (..., h, w): each map bilinearly resized to size x size (:func:`upsample`),
    its arg-max pixel (row, col) (first in row-major order on ties) and that pixel's centre (col + .5, row + .5)
    as (x, y) -> (pixels (..., 2) long, points (..., 2)). ``swap_xy`` gives (row + .5, col + .5) instead: their
    code reads numpy's (row, col) arg-max as (x, y)."""
    pixels = peak_cells(upsample(maps, size, size))
    centres = pixels.double() + 0.5
    return pixels, (centres if swap_xy else centres.flip(-1))


def caption_accuracy(box_hits: dict[object, list[bool]]) -> float:
    """Das et al.'s score in percent: per caption, the fraction of its phrases' boxes hit (each box its own
    trial), then the mean over captions; ``box_hits`` maps each caption to the hits of all its boxes."""
    fractions = [sum(hits) / len(hits) for hits in box_hits.values() if hits]
    return 100.0 * sum(fractions) / len(fractions)
