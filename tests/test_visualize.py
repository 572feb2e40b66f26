"""Heatmap figures (misc/visualize.py): colour scales, colour bars, titles, boxes and points, the PNG's size; and
the pointing game's pictures, which draw the boxes and the point that was scored."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from misc.eval import pointing
from misc.eval.localization import POINTING_K
from misc.inference import Inference
from misc.visualize import MARGIN, figure_size, overlays, panel_size, panel_title, save_png, title_height
from tests.test_localization import tiny_checkpoint  # noqa: F401 - the session fixture, a random tiny DSVE model

IMAGE = Image.new("RGB", (120, 80), (0, 0, 0))


def heat_maps() -> torch.Tensor:
    """Two 3 x 4 maps of very different ranges: [0, 1] and [10, 30]."""
    first = torch.linspace(0, 1, 12).reshape(3, 4)
    return torch.stack([first, 10 + 20 * first.flip(0)])


def panels(figure: Figure) -> list:
    return [axes for axes in figure.axes if axes.get_label() != "colorbar"]


def bars(figure: Figure) -> list:
    return [axes for axes in figure.axes if axes.get_label() == "colorbar"]


def heat_image(axes):
    [image] = [image for image in axes.images if image.get_label() == "heatmap"]
    return image


def test_each_panel_spans_its_own_map_unless_the_scale_is_shared():
    points = torch.tensor([[10.0, 20.0], [100.0, 70.0]])
    own = overlays(IMAGE, heat_maps(), points, ["first", "second"])
    limits = [heat_image(axes).get_clim() for axes in panels(own)]
    assert limits[0] == pytest.approx((0, 1)) and limits[1] == pytest.approx((10, 30))
    shared = overlays(IMAGE, heat_maps(), points, ["first", "second"], shared_scale=True)
    limits = [heat_image(axes).get_clim() for axes in panels(shared)]
    assert limits[0] == limits[1] == pytest.approx((0, 30))
    for figure in (own, shared):  # each colour bar reads its panel's scale
        for bar, axes in zip(bars(figure), panels(figure), strict=True):
            assert bar.get_ylim() == pytest.approx(heat_image(axes).get_clim())


def test_colour_map_is_perceptual_and_overridable():
    figure = overlays(IMAGE, heat_maps(), torch.zeros(2, 2), ["a", "b"])
    assert {heat_image(axes).get_cmap().name for axes in panels(figure)} == {"viridis"}
    figure = overlays(IMAGE, heat_maps(), torch.zeros(2, 2), ["a", "b"], colormap="inferno")
    assert {heat_image(axes).get_cmap().name for axes in panels(figure)} == {"inferno"}


def test_boxes_and_points_are_drawn_in_image_pixels(tmp_path):
    boxes = [[(30.0, 20.0, 40.0, 30.0), (0.0, 0.0, 10.0, 10.0)], []]
    figure = overlays(IMAGE, torch.zeros(2, 3, 4), torch.tensor([[50.0, 35.0], [5.0, 75.0]]), ["one", "two"],
                      boxes=boxes)
    first, second = panels(figure)
    drawn = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in first.patches if isinstance(p, Rectangle)]
    assert drawn == boxes[0] and not [p for p in second.patches if isinstance(p, Rectangle)]
    [marker] = [line for line in first.lines if isinstance(line, Line2D)]
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (50.0, 35.0)
    assert first.get_xlim() == (0, 120) and first.get_ylim() == (80, 0)  # y grows downwards, as in the image
    out = tmp_path / "boxes.png"
    save_png(figure, out)
    pixels = np.asarray(Image.open(out))
    panel_w, panel_h = panel_size(120, 80)
    scale = panel_w / 120
    left, top = MARGIN, MARGIN + title_height()
    edge_x = left + round(30 * scale)  # the first box's left edge, halfway down it
    edge_y = top + round(35 * scale)
    assert pixels[edge_y, edge_x - 2:edge_x + 3].max() >= 240  # its white line on the black image
    inside = pixels[edge_y, left + round(50 * scale) + 20]
    assert inside.max() < 200  # the map over black, no line


def test_titles_carry_score_and_unknown_words():
    title = panel_title("a man riding a horse on a beach near the sea at sunset with a dog running ahead", 0.4567,
                        ["qzxv"], width=256)
    lines = title.splitlines()
    assert len(lines) == 3 and lines[1].endswith("…")
    assert lines[2] == "score 0.457 · unknown: qzxv"
    assert panel_title("a dog") == "a dog"


def test_png_has_the_announced_size_and_grid(tmp_path):
    maps = torch.rand(5, 3, 4)
    figure = overlays(IMAGE, maps, torch.zeros(5, 2), [f"query {i}" for i in range(5)])
    out = tmp_path / "grid.png"
    save_png(figure, out)
    with Image.open(out) as png:
        assert png.mode == "RGB" and png.size == figure_size(120, 80, 5)
    one_row = figure_size(120, 80, 3)
    assert figure_size(120, 80, 5) == (one_row[0], 2 * one_row[1] - MARGIN)  # three columns, two rows
    assert len(bars(figure)) == 5


def test_mismatched_inputs_fail():
    with pytest.raises(ValueError, match="2 heatmaps, 1 points"):
        overlays(IMAGE, heat_maps(), torch.zeros(1, 2), ["a", "b"])
    with pytest.raises(ValueError, match="1 box lists for 2 queries"):
        overlays(IMAGE, heat_maps(), torch.zeros(2, 2), ["a", "b"], boxes=[[]])


def test_pointing_pictures_draw_the_boxes_and_the_scored_point(tiny_world, tiny_checkpoint, tmp_path,  # noqa: F811
                                                             monkeypatch):
    path = next((tiny_world / "images" / "val2014").glob("*.jpg"))
    model = Inference.load(tiny_checkpoint, device="cpu")
    phrases = [pointing.Phrase("a red circle", [(4.0, 8.0, 20.0, 16.0)], {}),
               pointing.Phrase("a blue square", [(0.0, 0.0, 32.0, 32.0), (40.0, 40.0, 8.0, 8.0)], {})]
    item = pointing.Item("photo", path, (64.0, 64.0), phrases)
    size = 128  # the rows' frame: twice the 64 px image
    rows = [{"point": [16.0, 48.0], "boxes": [[8.0, 16.0, 40.0, 32.0]], "hit": True},
            {"point": [100.0, 20.0], "boxes": [[0.0, 0.0, 64.0, 64.0], [80.0, 80.0, 16.0, 16.0]], "hit": False}]
    drawn: dict[Path, Figure] = {}
    monkeypatch.setattr(pointing, "save_png", lambda figure, out: drawn.setdefault(out, figure))
    written = pointing.write_overlays(model, [item], rows, size, model.choose_k(None, POINTING_K), "original",
                                      tmp_path)
    assert written == [tmp_path / "pointing_photo.png"]
    first, second = panels(drawn[written[0]])
    for axes, phrase in zip((first, second), phrases):
        assert [(p.get_x(), p.get_y(), p.get_width(), p.get_height())
                for p in axes.patches if isinstance(p, Rectangle)] == phrase.boxes
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in first.lines] == [(8.0, 24.0)]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in second.lines] == [(50.0, 10.0)]
    assert "(hit" in first.get_title() and "(miss" in second.get_title()
