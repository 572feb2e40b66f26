"""Heatmap overlays as in the paper's Fig. 1: one panel per text query, the image under its heatmap in false colours,
the peak marked with a dot and the query written below; several queries make a grid.

Drawn with PIL on matplotlib's colour maps and its bundled DejaVu font, so the PNG has an exact, predictable size
(:func:`figure_size`) and needs no display.
"""
from __future__ import annotations

import math
import textwrap
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from misc.files import atomic_path
from misc.localization import upsample

MIN_SIDE = 256  # a panel's shorter side is at least this
MAX_SIDE = 512  # and its longer side at most this, unless the image is very elongated
MARGIN = 8
FONT_SIZE = 18
CAPTION_LINES = 2
COLUMNS = 3


def panel_size(width: int, height: int) -> tuple[int, int]:
    """Size of one panel for a width x height image: longer side MAX_SIDE, shorter side at least MIN_SIDE."""
    scale = MAX_SIDE / max(width, height)
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def caption_height() -> int:
    return CAPTION_LINES * (FONT_SIZE + 4) + 8


def grid(count: int) -> tuple[int, int]:
    """(columns, rows) for ``count`` panels."""
    columns = min(count, COLUMNS)
    return columns, math.ceil(count / columns)


def figure_size(width: int, height: int, count: int) -> tuple[int, int]:
    """Pixel size (W, H) of the PNG for ``count`` queries on a width x height image."""
    panel_w, panel_h = panel_size(width, height)
    columns, rows = grid(count)
    return (columns * panel_w + (columns + 1) * MARGIN,
            rows * (panel_h + caption_height()) + (rows + 1) * MARGIN)


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), FONT_SIZE)


def false_colours(heatmap: torch.Tensor, colour_map: str = "jet") -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours of its values scaled to [0, 1] by its own min and max."""
    values = heatmap.float()
    span = float(values.max() - values.min())
    scaled = (values - values.min()) / span if span > 0 else torch.zeros_like(values)
    return (matplotlib.colormaps[colour_map](scaled.numpy())[..., :3] * 255).astype(np.uint8)


def overlay_panel(image: Image.Image, heatmap: torch.Tensor, peak: Sequence[float], alpha: float = 0.5) -> Image.Image:
    """One panel: the image blended with its false-colour heatmap (h, w) (bilinear, see misc.localization) and the
    peak (x, y), given in the image's pixel coordinates, marked with a dot."""
    panel_w, panel_h = panel_size(*image.size)
    base = np.asarray(image.convert("RGB").resize((panel_w, panel_h), Image.BILINEAR), dtype=np.float32)
    colours = false_colours(upsample(heatmap, panel_h, panel_w)).astype(np.float32)
    panel = Image.fromarray(((1 - alpha) * base + alpha * colours).round().astype(np.uint8))
    x, y = peak[0] * panel_w / image.size[0], peak[1] * panel_h / image.size[1]
    radius = max(4, min(panel_w, panel_h) // 40)
    ImageDraw.Draw(panel).ellipse((x - radius, y - radius, x + radius, y + radius), fill="white", outline="black",
                                  width=2)
    return panel


def caption_lines(text: str, width: int) -> list[str]:
    """The text wrapped to ``width`` pixels in at most CAPTION_LINES lines, the last one cut with an ellipsis."""
    font, lines = _font(), []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines += textwrap.wrap(word, max(1, int(len(word) * width / max(font.getlength(word), 1))))
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] += " …"
    while lines and font.getlength(lines[-1]) > width and len(lines[-1]) > 2:
        lines[-1] = lines[-1][:-3] + "…"
    return lines


def overlays(image: Image.Image, heatmaps: torch.Tensor, peaks: torch.Tensor, captions: Sequence[str],
             alpha: float = 0.5) -> Image.Image:
    """The figure: heatmaps (T, h, w) and peaks (T, 2) in image pixels, one captioned panel per query."""
    if not len(heatmaps) == len(peaks) == len(captions) > 0:
        raise ValueError(f"{len(heatmaps)} heatmaps, {len(peaks)} peaks and {len(captions)} captions")
    panel_w, panel_h = panel_size(*image.size)
    columns, _ = grid(len(captions))
    figure = Image.new("RGB", figure_size(*image.size, len(captions)), "white")
    draw, font = ImageDraw.Draw(figure), _font()
    for index, (heatmap, peak, caption) in enumerate(zip(heatmaps, peaks, captions)):
        row, column = divmod(index, columns)
        left = MARGIN + column * (panel_w + MARGIN)
        top = MARGIN + row * (panel_h + caption_height() + MARGIN)
        figure.paste(overlay_panel(image, heatmap, peak.tolist(), alpha), (left, top))
        for line_number, line in enumerate(caption_lines(caption, panel_w)):
            draw.text((left + panel_w / 2, top + panel_h + 6 + line_number * (FONT_SIZE + 4)), line, fill="black",
                      font=font, anchor="mt")
    return figure


def save_png(figure: Image.Image, path: Path | str) -> None:
    """Write the PNG atomically: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as temporary:
        figure.save(temporary, format="PNG")
