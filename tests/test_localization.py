"""Localization: eq. 8-9 against a direct evaluation, peaks and pointing on hand-made maps and boxes, IoU and AP on
hand-made masks, and the three localization CLIs end to end on a tiny demo world with a random-weight model."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from misc.store import checkpoint
from misc.config import TrainConfig
from models.config import ModelConfig
from misc.eval.localization import (cell_points, default_k, localization_side, peak_cells, peak_location,
                                     pointing_hits, scale_boxes, upsample)
from misc.eval.segmentation import (average_precision, binarize, bytescale, iou, original_average_precision,
                                    original_iou, original_prediction, original_truth)
from misc.visualize import MIN_SIDE, figure_size, panel_size
from models import heatmaps as eq9
from models.heatmaps import apply_filters, heatmaps, text_filters, top_k
from models.joint import build_model
from tests.conftest import run_cli, run_in_process


def eq9_by_loops(maps: torch.Tensor, weight: torch.Tensor, text: torch.Tensor, k: int) -> torch.Tensor:
    """H = sum over the k largest entries u of v of |v_u| G'_u, G'_u = sum_c A[u, c] G[c], one u at a time."""
    order = sorted(range(len(text)), key=lambda u: float(text[u]), reverse=True)[:k]
    total = torch.zeros(maps.shape[1:], dtype=torch.float64)
    for u in order:
        projected = sum(float(weight[u, c]) * maps[c].double() for c in range(maps.shape[0]))  # G'_u (h, w)
        total += abs(float(text[u])) * projected
    return total.float()


def fast_heatmaps(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 9 in the order every command computes it: one filter per text, applied at every position."""
    return apply_filters(maps, text_filters(weight, texts, k))


def random_inputs(seed: int, batch: int = 2, maps_dim: int = 6, dim: int = 10, texts: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, maps_dim, 3, 4, generator=g), torch.randn(dim, maps_dim, generator=g),
            torch.randn(texts, dim, generator=g), torch.randn(batch, texts, dim, generator=g))


# --------------------------------------------------------------------------- heatmaps

@pytest.mark.parametrize("order", [heatmaps, fast_heatmaps], ids=["as_written", "fast"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_heatmaps_equal_a_direct_evaluation_of_eq9(k, order):
    maps, weight, shared, paired = random_inputs(0)
    got_shared, got_paired = order(maps, weight, shared, k), order(maps, weight, paired, k)
    assert got_shared.shape == got_paired.shape == (2, 3, 3, 4)
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(got_shared[b, t], eq9_by_loops(maps[b], weight, shared[t], k),
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_paired[b, t], eq9_by_loops(maps[b], weight, paired[b, t], k),
                                       rtol=1e-4, atol=1e-4)


def test_selection_takes_the_largest_entries_weighted_by_their_magnitude():
    text = torch.tensor([[-9.0, 2.0, -0.5, 1.0]])  # the largest entries are 2 and 1, not -9
    weights, indices = top_k(text, 2)
    assert sorted(indices[0].tolist()) == [1, 3]
    weight = torch.eye(4)  # A = identity: the filter is |v_u| on the chosen rows
    torch.testing.assert_close(text_filters(weight, text, 2), torch.tensor([[0.0, 2.0, 0.0, 1.0]]))
    text = torch.tensor([[-3.0, -1.0, -2.0]])  # all negative: the least negative, weighted by |v_u|
    torch.testing.assert_close(text_filters(torch.eye(3), text, 1), torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("k", [1, 7, 10])
def test_selecting_rows_of_A_equals_the_full_product(k):
    maps, weight, shared, paired = random_inputs(1, batch=3, maps_dim=16, dim=10, texts=5)
    for texts in (shared, paired):
        torch.testing.assert_close(fast_heatmaps(maps, weight, texts, k), heatmaps(maps, weight, texts, k),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        apply_filters(maps, torch.randn(2, 5, 16))  # per-image filters for 2 images, maps of 3


def test_selection_through_integer_keys_equals_comparing_the_floats(monkeypatch):
    """top_k on float32 CPU texts selects through int32 keys; float64 takes torch's own topk: the same sets, with
    negatives, zeros, infinities, tiny and huge magnitudes and rows with fewer positive entries than k. The keys are
    made 4 rows at a time here, so the 6 rows take two blocks, the second one short."""
    monkeypatch.setattr(eq9, "KEY_ROWS", 4)
    g = torch.Generator().manual_seed(3)
    texts = torch.randn(6, 50, generator=g) * torch.logspace(-30, 30, 50)[torch.randperm(50, generator=g)]
    texts[0, :5] = torch.tensor([float("inf"), float("-inf"), 0.0, 1e-40, -1e-40])  # subnormals too
    texts[1] = -texts[1].abs()  # every entry negative: the least negative win
    texts[2] = torch.where(torch.arange(50) < 3, texts[2].abs(), -texts[2].abs())  # 3 positive entries, k = 8
    for k in (1, 8, 50):
        weights, indices = top_k(texts, k)
        reference_weights, reference = top_k(texts.double(), k)
        assert indices.dtype == reference.dtype == torch.int64
        assert torch.equal(indices.sort(dim=-1).values, reference.sort(dim=-1).values), k
        torch.testing.assert_close(weights, texts.gather(-1, indices).abs())
    weights, indices = top_k(texts.reshape(2, 3, 50), 8)  # leading dimensions are kept
    assert weights.shape == indices.shape == (2, 3, 8)
    assert torch.equal(indices.reshape(6, 8), top_k(texts, 8)[1])


def test_filters_in_column_panels_equal_whole_rows(monkeypatch):
    """text_filters reads A in column panels on the CPU: with panels of 16 columns (and a last, narrower one) every
    filter is the same sum in the same order as one pass over whole rows."""
    g = torch.Generator().manual_seed(5)
    weight, texts = torch.randn(30, 40, generator=g), torch.randn(2, 3, 30, generator=g)
    whole = text_filters(weight, texts, 7)  # 30 x 40 floats: one panel
    monkeypatch.setattr(eq9, "PANEL_BYTES", 16 * 30 * 4)  # 16 columns per panel: 16, 16, 8
    panels = text_filters(weight, texts, 7)
    assert panels.shape == (2, 3, 40)
    assert torch.equal(panels, whole)
    weights, indices = top_k(texts, 7)
    expected = (weights[..., None] * weight[indices]).sum(dim=-2)  # the k selected rows, weighted by |v_u|
    torch.testing.assert_close(panels, expected)


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), u the float32 unit roundoff: a float32 sum of n products is within
    gamma_n * sum |products| of the exact sum, in any order of summation."""
    u = torch.finfo(torch.float32).eps / 2
    return n * u / (1 - n * u)


def eq9_float64(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 8-9 in float64 in the original's order (every G'_u, then k of them), K(v) chosen on the float32 texts."""
    weights, indices = top_k(texts.float(), k)  # (B, T, k)
    projected = torch.einsum("uc,bcs->bus", weight.double(), maps.double().flatten(2))  # G' (B, d, hw)
    picked = torch.stack([projected[b, indices[b]] for b in range(len(maps))])  # (B, T, k, hw)
    return (weights.double()[..., None] * picked).sum(dim=2).reshape(*texts.shape[:2], *maps.shape[2:])


def test_fast_heatmaps_are_within_the_float32_bound_of_float64_and_no_worse_than_the_original_order():
    # The filter sums k terms, then f·G sums D' terms: |H - H64| <= gamma_{k+D'} (|v_sel|^T |A_sel|) |G|, the
    # bound of the two nested float32 sums (the inputs are float32 already, so rounding them adds nothing).
    g = torch.Generator().manual_seed(3)
    batch, maps_dim, dim, k = 6, 400, 300, 24
    maps = torch.randn(batch, maps_dim, 5, 5, generator=g)
    weight = torch.randn(dim, maps_dim, generator=g) * maps_dim ** -0.5
    texts = torch.nn.functional.normalize(torch.randn(batch, 8, dim, generator=g), dim=-1)
    exact = eq9_float64(maps, weight, texts, k)
    error = (fast_heatmaps(maps, weight, texts, k).double() - exact).abs()
    assert (error <= gamma(k + maps_dim) * eq9_float64(maps.abs(), weight.abs(), texts, k)).all()
    assert error.max() > 0  # float32 really was used: the bound is not checked against itself
    original_order = (heatmaps(maps, weight, texts, k).double() - exact).abs()  # float32, the original's order
    rms = [float(e.pow(2).mean().sqrt()) for e in (error, original_order)]
    assert rms[0] <= 1.25 * rms[1], rms  # the same order of error as the original's computation, not more


def test_matchmap_style_filters_are_within_the_float32_bound_of_float64():
    # The matchmap's phrase map is its mean word vector applied at every region (filters (T, D) or (B, T, D)):
    # one D-term float32 sum per position, within gamma_D sum |f_c G_c| of the float64 value.
    g = torch.Generator().manual_seed(4)
    maps, filters = torch.randn(3, 256, 6, 6, generator=g), torch.randn(3, 5, 256, generator=g)
    flat = maps.double().flatten(2)  # (B, D, hw)
    for f in (filters[0], filters):
        exact = torch.matmul(f.double(), flat).reshape(3, 5, 6, 6)
        bound = gamma(256) * torch.matmul(f.double().abs(), flat.abs()).reshape(3, 5, 6, 6)
        error = (apply_filters(maps, f).double() - exact).abs()
        assert (error <= bound).all() and error.max() > 0


def test_the_default_localization_side_is_the_test_size_in_whole_grid_cells():
    assert localization_side(400, 32) == 416  # the paper: test images at 400, heatmaps at 416 (13 x 13)
    assert localization_side(224, 16) == 224  # Das et al.: VGG-19 conv5_4, 14 x 14
    assert localization_side(96, 32) == 96  # the demo preset: 3 x 3
    assert localization_side(70, 32) == 96  # a size between cells rounds up


def test_default_k_scales_the_papers_ratio():
    assert default_k(2400, 180) == 180 and default_k(4800, 180) == 180
    assert default_k(256, 180) == 19 and default_k(32, 180) == 2
    assert default_k(2400, 10) == 10 and default_k(256, 10) == 1


# --------------------------------------------------------------------------- upsampling and peaks

def test_upsample_is_bilinear_with_half_pixel_centres():
    row = torch.tensor([[0.0, 4.0]])  # 1 x 2 -> 1 x 4: samples sit at x = 1 and 3 of [0, 4)
    torch.testing.assert_close(upsample(row, 1, 4), torch.tensor([[0.0, 1.0, 3.0, 4.0]]))
    stack = torch.randn(2, 3, 5, 7)
    assert upsample(stack, 20, 9).shape == (2, 3, 20, 9)
    torch.testing.assert_close(upsample(torch.full((1, 2, 2), 3.0), 6, 5), torch.full((1, 6, 5), 3.0))


@pytest.mark.parametrize("cell, size, expected", [
    ((0, 0), (400, 300), (50.0, 50.0)),  # top left corner of a 3 x 4 map on a 400 x 300 image
    ((2, 3), (400, 300), (350.0, 250.0)),  # bottom right
    ((0, 3), (400, 300), (350.0, 50.0)),  # top right
    ((1, 2), (80, 600), (50.0, 300.0)),  # a tall image
])
def test_peak_location_is_the_centre_of_the_largest_cell(cell, size, expected):
    heat = torch.zeros(3, 4)
    heat[cell] = 1.0
    assert peak_location(heat, *size).tolist() == list(expected)


def test_peak_location_non_square_map_ties_and_batches():
    heat = torch.zeros(2, 5)  # 2 rows, 5 columns on a 100 x 60 image: cells of 20 x 30
    heat[1, 4] = 2.0
    assert peak_location(heat, 100, 60).tolist() == [90.0, 45.0]
    assert peak_location(torch.ones(2, 5), 100, 60).tolist() == [10.0, 15.0]  # ties: first in row-major order
    batch = torch.zeros(2, 3, 2, 5)
    batch[1, 2, 0, 1] = 1.0
    peaks = peak_location(batch, 100, 60)
    assert peaks.shape == (2, 3, 2) and peaks[1, 2].tolist() == [30.0, 15.0]


def test_peak_of_the_upsampled_map_is_within_half_a_pixel_of_the_map_peak():
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        heat = torch.rand(4, 6, generator=g)
        coarse = peak_location(heat, 90, 52)
        fine = peak_location(upsample(heat, 52, 90), 90, 52)  # a pixel-resolution map: its pixel's centre
        assert (fine - coarse).abs().max() <= 0.5 + 1e-6


# --------------------------------------------------------------------------- pointing

def test_pointing_hits_inside_edges_outside_and_tolerance():
    box = [10.0, 20.0, 30.0, 40.0]  # x in [10, 40], y in [20, 60]
    points = torch.tensor([[25.0, 30.0], [10.0, 60.0], [40.0, 20.0], [43.0, 30.0], [43.0, 64.0], [5.0, 30.0]])
    boxes = torch.tensor([box] * len(points))
    assert pointing_hits(points, boxes).tolist() == [True, True, True, False, False, False]
    assert pointing_hits(points, boxes, tolerance=3).tolist() == [True, True, True, True, False, False]
    assert pointing_hits(points, boxes, tolerance=5).tolist() == [True] * 6  # (43, 64) is 5 px from (40, 60)
    assert pointing_hits(points, boxes, tolerance=4.9).tolist() == [True, True, True, True, False, False]


def test_original_protocol_points_at_the_top_left_corner_of_the_cell():
    cells = torch.tensor([[0, 0], [2, 3], [12, 12]])
    assert cell_points(cells, (13, 13), 416, 416, "original").tolist() == [[0, 0], [96, 64], [384, 384]]
    assert cell_points(cells, (13, 13), 416, 416, "centre").tolist() == [[16, 16], [112, 80], [400, 400]]
    assert cell_points(torch.tensor([1, 2]), (3, 4), 400, 300, "original").tolist() == [200, 100]
    with pytest.raises(ValueError):
        cell_points(cells, (13, 13), 416, 416, "corner")


def test_arg_max_ties_row_major_or_column_major():
    heat = torch.zeros(3, 4)
    heat[0, 2] = heat[1, 0] = 5.0  # a tie: (0, 2) first in row-major order, (1, 0) first in column-major order
    assert peak_cells(heat).tolist() == [0, 2]
    assert peak_cells(heat, column_major=True).tolist() == [1, 0]
    batch = torch.rand(2, 5, 3, 4)
    assert torch.equal(peak_cells(batch), peak_cells(batch, column_major=True))  # no tie: the same cell
    assert peak_cells(batch).shape == (2, 5, 2)


def test_strict_rule_at_cell_boundaries():
    # 416 px, 13 x 13 cells of 32 px: cell (2, 3) points at (96, 64) under original, (112, 80) under centre
    points = cell_points(torch.tensor([[2, 3]] * 4), (13, 13), 416, 416, "original")
    boxes = torch.tensor([[96.0, 64.0, 32.0, 32.0],  # the cell itself: its corner is on the box's edge
                          [95.9, 63.9, 32.0, 32.0],  # a hair up and left: strictly inside
                          [64.0, 32.0, 32.0, 32.0],  # the cell up-left: the corner is its bottom-right corner
                          [80.0, 60.0, 16.0, 40.0]])  # right edge at x = 96
    assert pointing_hits(points, boxes, strict=True).tolist() == [False, True, False, False]
    assert pointing_hits(points, boxes).tolist() == [True, True, True, True]
    centres = cell_points(torch.tensor([[2, 3]] * 4), (13, 13), 416, 416, "centre")
    assert pointing_hits(centres, boxes).tolist() == [True, True, False, False]
    assert pointing_hits(points, boxes, tolerance=0.5, strict=True).tolist() == [True] * 4  # on the edge: 0 px


def test_boxes_are_rescaled_to_the_frame_of_the_peak():
    boxes = torch.tensor([[100.0, 60.0, 200.0, 300.0]])  # in an 800 x 600 VG image
    torch.testing.assert_close(scale_boxes(boxes, (800, 600), (416, 416)),
                               torch.tensor([[52.0, 41.6, 104.0, 208.0]]))


# --------------------------------------------------------------------------- masks, IoU and AP

def test_binarize_is_relative_to_the_range_of_the_map():
    heat = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    assert binarize(heat, 0.45).tolist() == [[False, False], [True, True]]  # >= 0 + 0.45 * 4 = 1.8
    assert binarize(heat - 10, 0.45).tolist() == binarize(heat, 0.45).tolist()  # offsets change nothing
    assert binarize(torch.full((2, 2), 7.0), 0.45).all()


def test_iou_on_hand_made_masks():
    prediction, target = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    prediction[0, :4] = True  # 4 pixels
    target[0, 2:4] = True
    target[1, :4] = True  # 6 pixels, 2 shared
    assert iou(prediction, target) == pytest.approx(2 / 8)
    assert iou(target, target) == 1.0
    assert iou(prediction, torch.zeros_like(target)) == 0.0
    assert iou(torch.zeros_like(target), torch.zeros_like(target)) == 0.0


def test_average_precision_on_hand_made_rankings():
    # 5 images; the category is in images 0, 2 and 3; image 3's mask misses (IoU too low), images 1 and 4 have
    # no instance of it (negatives). Ranking by score: 0 (TP), 1 (FP), 2 (TP), 4 (FP), 3 (FP).
    scores = [0.9, 0.8, 0.7, 0.1, 0.6]
    correct = [True, False, True, False, False]
    assert average_precision(scores, correct, positives=3) == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert average_precision([0.5, 0.4, 0.3], [True, True, True], 3) == pytest.approx(1.0)
    assert average_precision([0.1, 0.9], [True, False], 1) == pytest.approx(0.5)
    assert average_precision([0.3, 0.3], [False, True], 1) == pytest.approx(0.5)  # ties keep the input order
    assert average_precision([0.9, 0.8], [False, False], 2) == 0.0  # positives never found
    assert average_precision([0.9, 0.8], [False, False], 0) is None  # no image has the category
    with pytest.raises(ValueError):
        average_precision([0.9, 0.8], [True, True], 1)


def test_original_average_precision_on_a_hand_made_case():
    """Five images, two categories, the original's rule (IoU threshold 0.4 unless said).

    Category A is in images 0, 2, 3, 4 with IoUs 0.8, 0.5, 0.2, 0.6; image 1 lacks it (IoU 0). Sorted by IoU:
    0.8, 0.6, 0.5, 0.2, 0. The first item (0.8) is never counted. Then 0.6 > 0.4: tp = 1, fp = 0, precision 1/1;
    0.5: tp = 2, precision 2/2; 0.2 and 0: false positives, recall unchanged. P = 4 images have A, each true
    positive adds precision / P: AP = (1 + 1) / 4 = 0.5. (The ranked AP over the same masks would credit 0.8 too.)

    Category B is in images 1 and 4 with IoUs 0.45 and 0.35. Sorted: 0.45, 0.35, 0, 0, 0. At 0.4 the only item
    above the threshold is the first, which is skipped: AP = 0. At 0.3: 0.35 is a true positive at rank 1 with
    precision 1/1: AP = 1 / 2. So mAP@0.4 = (0.5 + 0) / 2 = 0.25.
    """
    a_ious, a_present = [0.8, 0.0, 0.5, 0.2, 0.6], [True, False, True, True, True]
    b_ious, b_present = [0.0, 0.45, 0.0, 0.0, 0.35], [False, True, False, False, True]
    assert original_average_precision(a_ious, a_present, 0.4) == pytest.approx(0.5)
    assert original_average_precision(b_ious, b_present, 0.4) == 0.0
    assert original_average_precision(b_ious, b_present, 0.3) == pytest.approx(0.5)
    assert original_average_precision(a_ious, a_present, 0.6) == 0.0  # 0.6 is not strictly above 0.6
    assert original_average_precision([0.0, 0.0], [False, False], 0.3) is None
    assert (original_average_precision(a_ious, a_present, 0.4) + original_average_precision(b_ious, b_present, 0.4)
            ) / 2 == pytest.approx(0.25)


def test_original_masks_rescale_to_uint8_and_threshold_without_the_minimum():
    assert bytescale(np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32)).tolist() == [[0, 64], [128, 255]]
    assert bytescale(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]  # a constant map rescales to 0
    heat = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    assert original_prediction(heat, 0.45, side=2).tolist() == [[False, False], [True, True]]  # > 0.45 * 255
    assert original_prediction(heat + 10, 0.45, side=2).tolist() == [[False, False], [True, True]]
    assert original_prediction(torch.ones(3, 3), 0.45, side=4).sum() == 0  # 0 > 0 nowhere
    square = [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]]  # a polygon covering pixels 1..4 of an 8 x 8 image
    truth = original_truth([square], 8, 8, side=4)  # nearest 8 -> 4 samples source pixels 1, 3, 5, 7
    assert truth.tolist() == [[True, True, False, False], [True, True, False, False]] + [[False] * 4] * 2
    everything = [[0.0, 0.0, 8.0, 0.0, 8.0, 8.0, 0.0, 8.0]]  # the whole image: rescales to 0 everywhere
    assert not original_truth([everything], 8, 8, side=4).any()
    assert np.isnan(original_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))
    assert original_iou(np.eye(2, dtype=bool), np.ones((2, 2), bool)) == 0.5


def test_category_queries_are_name_and_plural():
    from misc.eval.segment import query
    assert query("cat") == "cat cats"
    assert query("bus") == "bus buses"
    assert query("person") == "person people"
    assert query("wine glass") == "wine glass wine glasses"
    assert query("teddy bear") == "teddy bear teddy bears"
    assert query("toothbrush") == "toothbrush toothbrushes"
    assert query("skis") == "skis" and query("sheep") == "sheep"


# --------------------------------------------------------------------------- CLIs on the tiny demo world

@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model in the project's checkpoint format, its word vectors the world's."""
    torch.manual_seed(0)
    model_config = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
    train_config = TrainConfig(dataset="demo", test_size=64)
    path = tmp_path_factory.mktemp("model") / "random.pth.tar"
    checkpoint.atomic_save({"format": "dsve-loc", "version": 1,
                            "config": {"model": asdict(model_config), "train": asdict(train_config),
                                       "word_vectors": str(tiny_world / "words" / "demo_word2vec.bin")},
                            "model": build_model(model_config).state_dict(), "epoch": 0, "best_rsum": 0.0,
                            "metrics": {}}, path)
    return path


def copy_world(world: Path, target: Path) -> Path:
    shutil.copytree(world, target)
    return target


CLI_FLAGS = ["--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_pointing_game_cli_counts_skips_and_matches_the_boxes(tiny_world, tiny_checkpoint, tmp_path):
    world = copy_world(tiny_world, tmp_path / "world")
    images = {i["image_id"]: i for i in json.loads((world / "vg" / "image_data.json").read_text())}
    entries = json.loads((world / "vg" / "region_descriptions.json").read_text())
    regions = [(entry["id"], region) for entry in entries for region in entry["regions"]]
    # bad phrases: empty, punctuation only, every word out of vocabulary; and one image file removed
    for (_, region), text in zip(regions[:3], ["", " ... ", "qzxv wvvq"]):
        region["phrase"] = text
    (world / "vg" / "region_descriptions.json").write_text(json.dumps(entries))
    gone = regions[-1][0]
    (world / "images" / "val2014" / f"COCO_val2014_{images[gone]['coco_id']:012d}.jpg").unlink()
    in_gone = sum(vg_id == gone for vg_id, _ in regions)
    out, results = tmp_path / "pg.json", tmp_path / "results.json"
    run_cli("pointing_game.py", "-p", tiny_checkpoint, "--size", "128", "--json", out, "--per-phrase",
            "--results", results, *CLI_FLAGS, world=world)

    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert report["skipped_reasons"] == {"image missing": in_gone, "no words": 2, "no word in vocabulary": 1}
    assert metrics["phrases"] + metrics["skipped"] == len(regions) and metrics["skipped"] == in_gone + 3
    assert len(report["per_phrase"]) == metrics["phrases"] and len(report["skipped_phrases"]) == metrics["skipped"]
    kept_images = {vg_id for vg_id, r in regions[3:] if vg_id != gone}
    assert metrics["images"] == len({r["vg_image_id"] for r in report["per_phrase"]}) == len(kept_images)
    assert report["settings"]["k"] == 2 and report["size"] == 128  # accuracy: re-derived from the rows below
    assert metrics["accuracy"] == pytest.approx(100 * sum(r["hit"] for r in report["per_phrase"]) / metrics["phrases"])

    # the centre baseline from the VG boxes alone: at 128 px the central cell (2, 2) of the 4 x 4 map has its
    # top-left corner at the image centre, which must lie strictly inside the box (original protocol)
    kept = {r["region_id"] for r in report["per_phrase"]}
    centre_hits = [r["x"] < images[vg_id]["width"] / 2 < r["x"] + r["width"] and
                   r["y"] < images[vg_id]["height"] / 2 < r["y"] + r["height"]
                   for vg_id, r in regions if r["region_id"] in kept]
    assert len(centre_hits) == metrics["phrases"] and report["protocol"] == "original"
    assert metrics["center_baseline"] == pytest.approx(100 * sum(centre_hits) / len(centre_hits))

    # re-derived from the rows: the peak cell's top-left corner, strictly inside the box
    strict_hits = 0
    for r in report["per_phrase"]:
        assert r["grid"] == [4, 4] and r["point"] == [32.0 * r["peak_cell"][1], 32.0 * r["peak_cell"][0]]
        x, y, w, h = r["box"]
        inside = x < r["point"][0] < x + w and y < r["point"][1] < y + h
        assert r["hit"] == inside
        strict_hits += inside
    assert metrics["accuracy"] == pytest.approx(100 * strict_hits / metrics["phrases"])
    shared = json.loads(results.read_text())["pointing_game"]
    assert shared["metrics"] == report["metrics"]


def test_pointing_game_split_limit_and_tolerance(tiny_world, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "pg.json"
    status = run_in_process("pointing_game.py", ["-p", tiny_checkpoint, "--size", "64", "--split", "test", "--limit",
                                                 "3", "--tolerance", "200", "--json", out, "--per-phrase",
                                                 "--overlays", tmp_path / "png", "--overlay-images", "2", *CLI_FLAGS],
                            tiny_world, monkeypatch)
    report = json.loads(out.read_text())
    assert status == 0 and report["metrics"]["images"] == 3 and report["images_from"] == "Karpathy split test"
    assert report["metrics"]["accuracy"] == report["metrics"]["center_baseline"] == 100.0  # 200 px: every box of 64 px
    assert report["settings"]["tolerance"] == 200
    first_two = list(dict.fromkeys(r["image_id"] for r in report["per_phrase"]))[:2]
    assert sorted((tmp_path / "png").iterdir()) == sorted(tmp_path / "png" / f"pointing_{c}.png" for c in first_two)
    for coco_id in first_two:
        phrases = sum(r["image_id"] == coco_id for r in report["per_phrase"])
        with Image.open(tmp_path / "png" / f"pointing_{coco_id}.png") as figure:
            assert figure.format == "PNG" and figure.size == figure_size(64, 64, phrases)


def test_pointing_game_centre_protocol_points_at_cell_centres(tiny_world, tiny_checkpoint, tmp_path, monkeypatch):
    out, results = tmp_path / "pg.json", tmp_path / "results.json"
    status = run_in_process("pointing_game.py", ["-p", tiny_checkpoint, "--size", "128", "--protocol", "centre",
                                                 "--limit", "4", "--json", out, "--per-phrase", "--results", results,
                                                 "--results-key", "pointing_game_centre", *CLI_FLAGS],
                            tiny_world, monkeypatch)
    report = json.loads(out.read_text())
    assert status == 0 and report["protocol"] == "centre" and report["size"] == 128
    hits = centre_hits = 0
    for r in report["per_phrase"]:
        row, col = r["peak_cell"]
        assert r["point"] == [32.0 * col + 16, 32.0 * row + 16]
        x, y, w, h = r["box"]
        assert r["hit"] == (x <= r["point"][0] <= x + w and y <= r["point"][1] <= y + h)
        assert r["center_hit"] == (x <= 80 <= x + w and y <= 80 <= y + h)  # the centre of cell (2, 2)
        hits, centre_hits = hits + r["hit"], centre_hits + r["center_hit"]
    assert report["metrics"]["accuracy"] == pytest.approx(100 * hits / report["metrics"]["phrases"])
    assert report["metrics"]["center_baseline"] == pytest.approx(100 * centre_hits / report["metrics"]["phrases"])
    assert set(json.loads(results.read_text())) == {"pointing_game_centre"}


@pytest.mark.parametrize("flags, message", [(["--overlays", "FILE"], "exists and is not a folder"),
                                            (["--overlays", "DIR", "--overlay-images", "0"], "whole number >= 1")])
def test_pointing_game_bad_overlay_flags_fail_before_work(tiny_world, tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                          flags, message):
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / f) if f in ("FILE", "DIR") else f for f in flags]
    status = run_in_process("pointing_game.py", ["-p", tiny_checkpoint, *flags, *CLI_FLAGS], tiny_world, monkeypatch)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--overlay" in lines[0]
    assert message in lines[0]
    assert not (tmp_path / "DIR").exists()


def original_map_from_rows(rows: list[dict], threshold: float) -> float:
    """The original's mAP re-derived from --per-image rows: per category, IoUs sorted decreasing (null = NaN), the
    first skipped, precision counted at every later IoU above the threshold, over the images having the category."""
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    aps = []
    for items in by_category.values():
        positives = sum(row["present"] for row in items)
        if not positives:
            continue
        values = sorted((float("nan") if row["iou"] is None else row["iou"] for row in items), reverse=True)
        above = [value > threshold for value in values]
        aps.append(sum(sum(above[1:i + 1]) / i for i in range(1, len(values)) if above[i]) / positives)
    return sum(aps) / len(aps)


@pytest.mark.slow
def test_semantic_segmentation_cli_original_protocol(tiny_world, tiny_checkpoint, tmp_path):
    out, results = tmp_path / "seg.json", tmp_path / "results.json"
    run_cli("semantic_seg.py", "-p", tiny_checkpoint, "--json", out, "--per-image", "--results", results, *CLI_FLAGS,
            world=tiny_world)
    report = json.loads(out.read_text())
    instances = json.loads((tiny_world / "annotations" / "instances_val2014.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present = {(a["image_id"], names[a["category_id"]]) for a in instances["annotations"]}
    assert report["protocol"] == "original" and report["metrics"]["images"] == len(instances["images"])  # every image
    assert report["settings"]["k"] == 1 and report["settings"]["threshold"] == 0.45
    assert report["settings"]["mask_side"] == 200
    assert report["queries"] == {name: f"{name} {name}s" for name in names.values()}
    rows = report["per_image"]
    assert len(rows) == len(instances["images"]) * len(names)
    assert {(r["image_id"], r["category"]) for r in rows if r["present"]} == present
    assert all(r["iou"] == 0 for r in rows if not r["present"])
    for t in (0.3, 0.4, 0.5):
        assert report["metrics"][f"mAP@{t}"] == pytest.approx(100 * original_map_from_rows(rows, t))  # percent
    shared = json.loads(results.read_text())["semantic_segmentation"]
    assert shared["metrics"]["mAP@0.5"] == report["metrics"]["mAP@0.5"]


def test_semantic_segmentation_cli_ranked_protocol(tiny_world, tiny_checkpoint, tmp_path, monkeypatch):
    out, results = tmp_path / "seg.json", tmp_path / "results.json"
    status = run_in_process("semantic_seg.py", ["-p", tiny_checkpoint, "--protocol", "ranked", "--json", out,
                                                "--per-image", "--results", results, "--results-key",
                                                "semantic_segmentation_ranked", *CLI_FLAGS], tiny_world, monkeypatch)
    report = json.loads(out.read_text())
    test_ids = {e["cocoid"] for e in json.loads((tiny_world / "dataset_coco.json").read_text())["images"]
                if e["split"] == "test"}
    instances = json.loads((tiny_world / "annotations" / "instances_val2014.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present = {(a["image_id"], a["category_id"]) for a in instances["annotations"] if a["image_id"] in test_ids}
    assert status == 0 and report["protocol"] == "ranked" and report["metrics"]["images"] == len(test_ids)
    assert set(report["per_category"]) == set(names.values())
    for category, name in names.items():
        entry = report["per_category"][name]
        assert entry["query"] == (f"{name} {name}es" if name == "cross" else f"{name} {name}s")
        assert entry["positives"] == sum(c == category for _, c in present)
        rows = [r for r in report["per_image"] if r["category"] == name]
        for t in (0.3, 0.4, 0.5):
            expected = average_precision([r["score"] for r in rows],
                                         [r["present"] and r["iou"] >= t for r in rows], entry["positives"])
            assert entry[f"AP@{t}"] == (None if expected is None else pytest.approx(100 * expected))
    for t in (0.3, 0.4, 0.5):  # the mean over the categories with positives of the APs re-derived above
        aps = [entry[f"AP@{t}"] for entry in report["per_category"].values() if entry["positives"]]
        assert report["metrics"][f"mAP@{t}"] == pytest.approx(sum(aps) / len(aps))
    assert set(json.loads(results.read_text())) == {"semantic_segmentation_ranked"}


def test_localize_writes_a_png_of_the_expected_size(tiny_world, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    image = next((tiny_world / "images" / "val2014").glob("*.jpg"))
    out = tmp_path / "figures" / "overlay.png"
    status = run_in_process("localize.py", ["-p", tiny_checkpoint, "-i", image, "-t", "a red circle", "-t",
                                            "the big square", "-o", out, "--device", "cpu"], tiny_world, monkeypatch)
    assert status == 0 and "peak of 'a red circle'" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == figure_size(64, 64, 2)
    assert min(panel_size(64, 64)) >= MIN_SIDE and figure_size(64, 64, 2)[0] >= 2 * MIN_SIDE
    assert sorted(p.name for p in out.parent.iterdir()) == ["overlay.png"]  # no temporary file left behind


def test_localize_rejects_a_query_without_words(tiny_world, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    image = next((tiny_world / "images" / "val2014").glob("*.jpg"))
    status = run_in_process("localize.py", ["-p", tiny_checkpoint, "-i", image, "-t", "a circle", "-t", " ?! ", "-o",
                                            tmp_path / "x.png"], tiny_world, monkeypatch)
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: query ' ?! ' has no words"]
    assert not (tmp_path / "x.png").exists()


def test_missing_visual_genome_file_is_a_one_line_error_naming_the_key(tiny_world, tiny_checkpoint, tmp_path,
                                                                      monkeypatch, capsys):
    world = copy_world(tiny_world, tmp_path / "world")
    (world / "vg" / "region_descriptions.json").unlink()
    status = run_in_process("pointing_game.py", ["-p", tiny_checkpoint, *CLI_FLAGS], world, monkeypatch)
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'vg_dir'" in lines[0]
    assert "region_descriptions.json" in lines[0]


def recomputed_heatmap(model, image: Path, size: int, text: str, k: int | None) -> torch.Tensor:
    """A text's heatmap worked out in the test: the image resized to size x size, the maps G and the text's filter
    from the model, and eq. 9's sum over channels written out here (h, w)."""
    with Image.open(image) as picture, torch.no_grad():
        maps = model.maps(model.transform(size)(picture.convert("RGB"))[None])[0]  # (C, h, w)
    weights = model.filters([text], k)[0]  # (C,)
    return (weights[:, None, None] * maps).sum(dim=0)


def test_pointing_rows_match_a_peak_and_box_test_recomputed_here(tiny_world, tiny_checkpoint, tmp_path, monkeypatch):
    """A sample of --per-phrase rows against the arg-max of a heatmap recomputed in the test, and a hit worked out
    from the Visual Genome box numbers (original protocol: the cell's top-left pixel strictly inside the box, or with
    --tolerance within that Euclidean distance of it, so that the sample holds hits as well as misses)."""
    from misc.inference import Inference

    out, size, tolerance = tmp_path / "pg.json", 128, 16
    status = run_in_process("pointing_game.py", ["-p", tiny_checkpoint, "--size", size, "--limit", "6", "--tolerance",
                                                 tolerance, "--json", out, "--per-phrase", *CLI_FLAGS],
                            tiny_world, monkeypatch)
    report = json.loads(out.read_text())
    assert status == 0 and report["protocol"] == "original"
    images = {i["image_id"]: i for i in json.loads((tiny_world / "vg" / "image_data.json").read_text())}
    regions = {region["region_id"]: region for entry in
               json.loads((tiny_world / "vg" / "region_descriptions.json").read_text()) for region in entry["regions"]}
    model = Inference.load(tiny_checkpoint, device="cpu")
    rows = report["per_phrase"][:8]
    hits = []
    for row in rows:
        image = images[row["vg_image_id"]]
        file = tiny_world / "images" / "val2014" / f"COCO_val2014_{image['coco_id']:012d}.jpg"
        heat = recomputed_heatmap(model, file, size, regions[row["region_id"]]["phrase"], report["settings"]["k"])
        h, w = heat.shape
        # the arg-max, ties broken column-major as the original does: the smallest column, then the smallest row
        top = heat.max()
        peak = min(((r, c) for r in range(h) for c in range(w) if heat[r, c] == top), key=lambda rc: (rc[1], rc[0]))
        assert row["peak_cell"] == list(peak)
        x, y = peak[1] * size / w, peak[0] * size / h  # the cell's top-left pixel in the size x size frame
        region = regions[row["region_id"]]
        sx, sy = size / image["width"], size / image["height"]
        left, right = region["x"] * sx, (region["x"] + region["width"]) * sx
        upper, lower = region["y"] * sy, (region["y"] + region["height"]) * sy
        away = math.hypot(max(left - x, 0, x - right), max(upper - y, 0, y - lower))  # 0 inside or on an edge
        hits.append((left < x < right and upper < y < lower) or away <= tolerance)
        assert row["hit"] == hits[-1]
    assert len(rows) == 8 and set(hits) == {True, False}  # both sides of the rule are checked


def category_mask(coco, image_id: int, category_id: int, shape: tuple[int, int]) -> np.ndarray:
    """The union of an image's annotation masks of one category (pycocotools' annToMask), as booleans."""
    truth = np.zeros(shape, dtype=bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[category_id], iscrowd=None)):
        truth |= coco.annToMask(ann).astype(bool)
    return truth


def rle_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """pycocotools' IoU of two boolean masks, through their RLE encodings."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.stack([predicted, truth], axis=2).astype(np.uint8)))
    return float(mask_utils.iou([encoded[0]], [encoded[1]], [0])[0, 0])


def test_ranked_segmentation_ious_match_pycocotools_on_masks_made_here(tiny_world, tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    """A sample of --per-image IoUs (ranked protocol) against pycocotools' IoU of RLE masks: the prediction is the
    heatmap recomputed in the test, upsampled bilinearly to the image and kept where it reaches
    min + t (max - min); the truth the union of the category's annotation masks."""
    import torch.nn.functional as F
    from pycocotools.coco import COCO

    from misc.inference import Inference

    out = tmp_path / "seg.json"
    status = run_in_process("semantic_seg.py", ["-p", tiny_checkpoint, "--protocol", "ranked", "--limit", "3", "--json",
                                                out, "--per-image", *CLI_FLAGS], tiny_world, monkeypatch)
    report = json.loads(out.read_text())
    assert status == 0 and report["protocol"] == "ranked"
    coco = COCO(str(tiny_world / "annotations" / "instances_val2014.json"))
    ids = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    model = Inference.load(tiny_checkpoint, device="cpu")
    threshold, k = report["settings"]["threshold"], report["settings"]["k"]
    rows = [row for row in report["per_image"] if row["present"]][:4]
    assert len(rows) == 4 and len({row["iou"] for row in rows}) > 1
    for row in rows:
        info = coco.imgs[row["image_id"]]
        query = report["per_category"][row["category"]]["query"]
        file = tiny_world / "images" / "val2014" / info["file_name"]
        heat = recomputed_heatmap(model, file, report["size"], query, k)
        resized = F.interpolate(heat[None, None], size=(info["height"], info["width"]), mode="bilinear",
                                align_corners=False)[0, 0]
        predicted = (resized >= resized.min() + threshold * (resized.max() - resized.min())).numpy()
        truth = category_mask(coco, row["image_id"], ids[row["category"]], (info["height"], info["width"]))
        assert row["iou"] == pytest.approx(rle_iou(predicted, truth), abs=1e-9)


def test_original_segmentation_ious_match_pycocotools_on_masks_made_here(tiny_world, tiny_checkpoint, tmp_path,
                                                                         monkeypatch):
    """A sample of --per-image IoUs (original protocol) worked out apart from misc/eval/segmentation.py: the heatmap
    from Inference.heatmaps, rescaled to uint8 ((v - min) 255 / (max - min) + 0.5, truncated), resized to 200 x 200
    by Pillow (bilinear) and kept strictly above t (max - min); the truth the union of the category's annotation
    masks (annToMask), resized to 200 x 200 (nearest); the IoU pycocotools' on the two RLE masks."""
    from pycocotools.coco import COCO

    from misc.inference import Inference

    out, side = tmp_path / "seg.json", 200  # the original's mask side
    status = run_in_process("semantic_seg.py", ["-p", tiny_checkpoint, "--limit", "3", "--json", out, "--per-image",
                                                *CLI_FLAGS], tiny_world, monkeypatch)
    report = json.loads(out.read_text())
    assert status == 0 and report["protocol"] == "original"
    coco = COCO(str(tiny_world / "annotations" / "instances_val2014.json"))
    ids = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    model = Inference.load(tiny_checkpoint, device="cpu")
    threshold, k = report["settings"]["threshold"], report["settings"]["k"]
    rows = [row for row in report["per_image"] if row["present"]][:5]
    assert len(rows) == 5 and len({row["iou"] for row in rows}) > 1
    for row in rows:
        info = coco.imgs[row["image_id"]]
        file, query = tiny_world / "images" / "val2014" / info["file_name"], report["queries"][row["category"]]
        found = model.heatmaps(file, query, size=report["size"], k=k)
        heat = found.maps[0].numpy().astype(np.float32)  # (h, w)
        scaled = ((heat - heat.min()) * np.float32(255.0 / float(heat.max() - heat.min())) + np.float32(0.5))
        small = np.asarray(Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L").resize(
            (side, side), resample=Image.Resampling.BILINEAR)).astype(int)
        predicted = small > threshold * (small.max() - small.min())
        truth = category_mask(coco, row["image_id"], ids[row["category"]], (info["height"], info["width"]))
        assert 0 < truth.sum() < truth.size  # else the original's uint8 rescale would empty it
        truth = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255, mode="L").resize(
            (side, side), resample=Image.Resampling.NEAREST)) > 0
        assert row["iou"] == pytest.approx(rle_iou(predicted, truth), abs=1e-9)
