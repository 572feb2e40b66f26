"""Heatmap figures as in the paper's Fig. 1: one panel per text query, the image under the query's heatmap (eq. 9)
in a perceptual colour map with its colour bar, the peak (or the point a pointing rule made of it) marked, the
query with its score and unknown words as the panel's title, and optionally the ground-truth boxes; several
queries make a grid.

Figures are matplotlib :class:`~matplotlib.figure.Figure` objects drawn by the Agg canvas (no display, no pyplot
state: a notebook shows them, :func:`save_png` writes them). The layout is fixed in pixels, so a PNG's size is
known beforehand (:func:`figure_size`).
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from misc.store.files import atomic_path
from misc.eval.localization import upsample

DEFAULT_COLORMAP = "viridis"  # perceptually uniform: equal steps of heat look like equal steps of colour
MIN_SIDE = 256  # a panel's shorter side is at least this (pixels)
MAX_SIDE = 512  # and its longer side at most this, unless the image is very elongated
MARGIN = 12
DPI = 100
FONT_POINTS = 10
LINE = 17  # pixels per title line at FONT_POINTS
TITLE_LINES = 3  # the query on at most two lines, then its score and unknown words
BAR_GAP, BAR_WIDTH, BAR_LABELS = 6, 12, 52  # the colour bar right of each panel and its tick labels
Box = Sequence[float]  # x, y, width, height in the image's pixels


def panel_size(width: int, height: int) -> tuple[int, int]:
    """Size of one panel's image area for a width x height image: longer side MAX_SIDE, shorter side at least
    MIN_SIDE."""
    scale = MAX_SIDE / max(width, height)
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def title_height() -> int:
    return TITLE_LINES * LINE + 6


def cell_size(width: int, height: int) -> tuple[int, int]:
    """Pixels of one panel with its colour bar and title."""
    panel_w, panel_h = panel_size(width, height)
    return panel_w + BAR_GAP + BAR_WIDTH + BAR_LABELS, panel_h + title_height()


def grid(count: int, columns: int = 3) -> tuple[int, int]:
    """(columns, rows) for ``count`` panels."""
    columns = min(count, columns)
    return columns, math.ceil(count / columns)


def figure_size(width: int, height: int, count: int) -> tuple[int, int]:
    """Pixel size (W, H) of the figure for ``count`` queries on a width x height image."""
    cell_w, cell_h = cell_size(width, height)
    columns, rows = grid(count)
    return columns * cell_w + (columns + 1) * MARGIN, rows * cell_h + (rows + 1) * MARGIN


def panel_title(text: str, score: float | None = None, unknown: Sequence[str] = (), width: int = MIN_SIDE) -> str:
    """A panel's title: the query wrapped to about ``width`` pixels (two lines at most), then its score and the
    words the model does not know."""
    chars = max(8, int(width / (0.6 * FONT_POINTS * DPI / 72)))
    lines = textwrap.wrap(text, chars, max_lines=2, placeholder=" …") or [text]
    details = ([f"score {score:.3f}"] if score is not None else []) + (
        [f"unknown: {', '.join(unknown)}"] if unknown else [])
    if details:
        lines.append(textwrap.shorten(" · ".join(details), chars, placeholder=" …"))
    return "\n".join(lines)


def _outlined(width: float) -> list:
    """A black outline under white marks, so that they show on any colour of the map."""
    return [patheffects.withStroke(linewidth=width + 2.5, foreground="black")]


def overlays(image: Image.Image, heatmaps: torch.Tensor, points: torch.Tensor, titles: Sequence[str],
             boxes: Sequence[Sequence[Box]] | None = None, shared_scale: bool = False, alpha: float = 0.5,
             colormap: str = DEFAULT_COLORMAP) -> Figure:
    """The figure: heatmaps (T, h, w) spread bilinearly over the image (see misc.eval.localization), points (T, 2) as
    (x, y) in the image's pixels, one title per query, and per query the boxes to draw (x, y, w, h in the image's
    pixels). Each panel's colours span its own map's range, or with ``shared_scale`` the range of all maps, so
    that panels compare; the colour bar beside each panel reads the heat values (eq. 9)."""
    if not len(heatmaps) == len(points) == len(titles) > 0:
        raise ValueError(f"{len(heatmaps)} heatmaps, {len(points)} points and {len(titles)} titles")
    if boxes is not None and len(boxes) != len(titles):
        raise ValueError(f"{len(boxes)} box lists for {len(titles)} queries")
    width, height = image.size
    panel_w, panel_h = panel_size(width, height)
    cell_w, cell_h = cell_size(width, height)
    fig_w, fig_h = figure_size(width, height, len(titles))
    columns, _ = grid(len(titles))
    figure = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    background = np.asarray(image.convert("RGB").resize((panel_w, panel_h), Image.BILINEAR))
    spread = upsample(heatmaps.detach().float().cpu(), panel_h, panel_w).numpy()  # (T, panel_h, panel_w)
    shared = Normalize(float(spread.min()), float(spread.max())) if shared_scale else None
    extent = (0, width, height, 0)
    for index, title in enumerate(titles):
        row, column = divmod(index, columns)
        left = MARGIN + column * (cell_w + MARGIN)
        bottom = fig_h - (MARGIN + row * (cell_h + MARGIN) + cell_h)
        axes = figure.add_axes((left / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
        norm = shared or Normalize(float(spread[index].min()), float(spread[index].max()))
        axes.imshow(background, extent=extent)
        axes.imshow(spread[index], extent=extent, cmap=colormap, norm=norm, alpha=alpha, label="heatmap")
        for x, y, w, h in (boxes[index] if boxes is not None else ()):
            axes.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=2,
                                     path_effects=_outlined(2)))
        x, y = points[index].tolist()
        axes.plot([x], [y], marker="o", markersize=8, markerfacecolor="white", markeredgecolor="black",
                  markeredgewidth=1.5, linestyle="none", clip_on=False)  # a corner point shows whole
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        axes.set_axis_off()
        axes.set_title(title, fontsize=FONT_POINTS, pad=4)
        bar = figure.add_axes(((left + panel_w + BAR_GAP) / fig_w, bottom / fig_h, BAR_WIDTH / fig_w,
                               panel_h / fig_h), label="colorbar")
        figure.colorbar(ScalarMappable(norm=norm, cmap=colormap), cax=bar).ax.tick_params(labelsize=FONT_POINTS - 2)
    return figure


def figure_image(figure: Figure) -> Image.Image:
    """A matplotlib figure drawn (Agg, no display) into an RGB image."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def save_png(figure: Figure, path: Path | str) -> None:
    """Write the figure as an RGB PNG of exactly :func:`figure_size` pixels, atomically (a temporary file in the
    same folder, then a rename)."""
    rgb = figure_image(figure)
    with atomic_path(path) as temporary:
        rgb.save(temporary, format="PNG")
