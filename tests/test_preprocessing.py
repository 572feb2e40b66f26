"""Evaluation preprocessing (misc.data.datasets.eval_transform) against values worked out by hand: the geometry of
both protocols and the ImageNet normalisation, on images whose colours say where each pixel came from."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from misc.data.datasets import eval_transform
from misc.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's models were trained
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(value / 255 - mean) / std for value, mean, std in zip(rgb, MEAN, STD)])


def bands(width: int, height: int) -> Image.Image:
    """Three vertical bands of equal width: red, green, blue from left to right."""
    image = Image.new("RGB", (width, height))
    for index, colour in enumerate((RED, GREEN, BLUE)):
        image.paste(colour, (index * width // 3, 0, (index + 1) * width // 3, height))
    return image


def test_resize_ignores_the_aspect_ratio_and_normalises_with_imagenet_statistics():
    out = eval_transform(400)(bands(600, 300))
    assert out.shape == (3, 400, 400)  # the original release's protocol: size x size whatever the shape
    # bands of 200 px become 133.3 px wide; columns well inside each band keep its colour on every row
    for column, colour in ((60, RED), (200, GREEN), (340, BLUE)):
        torch.testing.assert_close(out[:, :, column], normalised(colour)[:, None].expand(3, 400), rtol=0, atol=1e-5)


def test_crop_takes_the_centre_224_256_of_the_image_with_its_smaller_side_at_size():
    out = eval_transform(256, "crop")(bands(600, 300))
    assert out.shape == (3, 224, 224)
    # 600 x 300 -> 512 x 256; the centre 224 columns are 144..367, where the bands (edges at 170.7 and 341.3)
    # fall at crop columns 0..26, 27..197 and 198..223
    for column, colour in ((5, RED), (112, GREEN), (220, BLUE)):
        torch.testing.assert_close(out[:, :, column], normalised(colour)[:, None].expand(3, 224), rtol=0, atol=1e-5)


def test_an_unknown_protocol_is_refused():
    with pytest.raises(UserError, match="unknown evaluation protocol 'squash'"):
        eval_transform(400, "squash")
