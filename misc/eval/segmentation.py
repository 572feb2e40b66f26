"""Segmentation from heatmaps (paper §4.3): masks, IoU and the two AP protocols of semantic_seg.py.

``ranked`` (the paper's text): every (image, category) pair is a prediction ranked by a score, a true positive when
the category is present and its mask's IoU reaches the threshold; non-interpolated AP (:func:`average_precision`).

``original`` (what the original release's semantic_seg.py computes): masks at 200 x 200 built as scipy's
``imresize`` built them (a uint8 rescale, :func:`bytescale`, then a Pillow resize), and its AP over the images
sorted by IoU (:func:`original_average_precision`). Everything here is arithmetic on arrays; nothing reads files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

ORIGINAL_SIDE = 200  # the original compares masks at 200 x 200 whatever the image size


# --------------------------------------------------------------------------- the ranked protocol

def binarize(heatmap: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of the heatmap where it reaches min + threshold · (max - min) (relative to its own range, so a
    constant offset of the map changes nothing; a constant map is all foreground)."""
    low, high = heatmap.min(), heatmap.max()
    return heatmap >= low + threshold * (high - low)


def iou(prediction: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Intersection over union of two boolean masks; 0 when both are empty (no object: never a true positive)."""
    prediction, target = torch.as_tensor(prediction, dtype=torch.bool), torch.as_tensor(target, dtype=torch.bool)
    union = int((prediction | target).sum())
    return int((prediction & target).sum()) / union if union else 0.0


def average_precision(scores: Sequence[float] | torch.Tensor, correct: Sequence[bool] | torch.Tensor,
                      positives: int) -> float | None:
    """Non-interpolated AP: predictions ranked by decreasing score (stable on ties), the mean over the
    ``positives`` ground-truth items of the precision at the rank where each is found (0 for those never
    found). None when there is no positive."""
    if positives <= 0:
        return None
    scores, correct = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(correct, dtype=torch.bool)
    if int(correct.sum()) > positives:
        raise ValueError(f"{int(correct.sum())} correct predictions but only {positives} positives")
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = correct[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / positives)


# --------------------------------------------------------------------------- the original protocol

def bytescale(array: np.ndarray) -> np.ndarray:
    """scipy.misc.bytescale as imresize called it: (a - min) · 255 / (max - min) + 0.5, truncated to uint8 (a
    constant array gives zeros). Float32 input stays float32 arithmetic, with the scale formed in float64 first."""
    array = np.asarray(array)
    low, span = array.min(), array.max() - array.min()
    scale = 255.0 / float(span if span != 0 else 1)
    scaled = (array - low) * array.dtype.type(scale)
    return (np.clip(scaled, 0, 255) + array.dtype.type(0.5)).astype(np.uint8)


def resize_uint8(image: np.ndarray, side: int, resample: Image.Resampling) -> np.ndarray:
    """A uint8 (H, W) array resized to side x side by Pillow, as scipy.misc.imresize did."""
    return np.asarray(Image.fromarray(image, mode="L").resize((side, side), resample=resample))


def original_prediction(heatmap: torch.Tensor | np.ndarray, threshold: float, side: int = ORIGINAL_SIDE) -> np.ndarray:
    """The original's mask of one heatmap (h, w): uint8 rescale, bilinear resize to side x side, then the pixels
    strictly above threshold · (max - min) of the resized map (no + min) -> (side, side) bool."""
    resized = resize_uint8(bytescale(np.asarray(heatmap, dtype=np.float32)), side, Image.Resampling.BILINEAR)
    return resized > threshold * (int(resized.max()) - int(resized.min()))


def original_truth(segmentations: Sequence[list | dict], height: int, width: int,
                   side: int = ORIGINAL_SIDE) -> np.ndarray:
    """The original's ground truth of one category in one image -> (side, side) bool.

    ``segmentations`` are the category's COCO ``segmentation`` entries in annotation order: RLE masks are added
    up and polygons overwrite with 1 on a height x width canvas; the canvas goes through the uint8 rescale and a
    nearest resize, and the mask is what is left above 0 (so a canvas that covers the whole image evenly rescales
    to 0 everywhere, as in the original). Polygons are rasterised by pycocotools (as annToMask does); the original
    filled them with cv2.fillPoly on vertices truncated to integers, which differs on boundary pixels.
    """
    canvas = np.zeros((height, width))
    for segmentation in segmentations:
        if isinstance(segmentation, dict):
            rle = segmentation
            if isinstance(rle["counts"], list):
                rle = mask_utils.frPyObjects([rle], *rle["size"])[0]
            canvas += mask_utils.decode(rle)
        else:
            canvas[mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))) > 0] = 1
    return resize_uint8(bytescale(canvas), side, Image.Resampling.NEAREST) > 0


def original_iou(prediction: np.ndarray, target: np.ndarray) -> float:
    """The original's IoU: NaN when both masks are empty (0 / 0)."""
    intersection = int(np.sum(prediction & target))
    union = int(np.sum(prediction)) + int(np.sum(target)) - intersection
    return intersection / union if union else math.nan


def original_average_precision(ious: Sequence[float], present: Sequence[bool], threshold: float) -> float | None:
    """AP of one category as the original computed it, over every image in evaluation order.

    The images are sorted by IoU, decreasing, with Python's stable sort (ties keep the image order; an image
    without the category has IoU 0). Walking the sorted list from its SECOND item (the first is never counted),
    an item is a true positive when its IoU is strictly above ``threshold`` and a false positive otherwise. With
    tp_i and fp_i the running counts at item i and P the images that have the category, AP = sum over the true
    positives i of (tp_i / (tp_i + fp_i)) · (1 / P). None when P = 0 (the original divides by zero: NaN).
    """
    positives = int(sum(bool(p) for p in present))
    if positives == 0:
        return None
    ranked = sorted(ious, reverse=True)
    total, found = 0.0, 0
    for seen, value in enumerate(ranked[1:], start=1):
        if value > threshold:
            found += 1
            total += found / seen
    return total / positives
