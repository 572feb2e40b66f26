"""Queries of a collection, as search.py and its server take them: texts embedded (eq. 4), an image file or an
uploaded image embedded (eq. 1-3), a path checked to lie inside the collection's folder, where a text is in
each found image (eq. 9 heatmap: its peak and the box of the thresholded map around it), and the captions of an
image collection as the text queries of its index report."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from misc.errors import UserError

if TYPE_CHECKING:
    from misc.collections.search import Collection
    from misc.inference import Inference

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # an upload declaring more pixels is refused before it is decoded
BOX_THRESHOLD = 0.5  # share of the map's range above its minimum that a cell must reach to be in the box


def text_embeddings(model: Inference, texts: list[str]) -> np.ndarray:
    """Unit embeddings (Q, d) of query texts (eq. 4); a text without a known word is a :class:`UserError`."""
    from misc.collections.texts import count_oov

    oov, tokens = count_oov(model.words, texts)
    for text, count in zip(texts, tokens):
        if not count:
            raise UserError(f"query {text!r} has no words")
    if oov.sum():
        log.warning("%d of %d query words are not in the vocabulary (mapped to UNK)", oov.sum(), tokens.sum())
    features = model.embed_texts(list(texts)).numpy()
    for text, norm in zip(texts, np.linalg.norm(features, axis=1)):
        if norm < 0.5:
            raise UserError(f"query {text!r}: none of its words is in the vocabulary of {model.words.source}")
    return features


def caption_queries(model: Inference | None, collection: Collection, count: int = 1000,
                    seed: int = 0) -> np.ndarray | None:
    """Text-to-image queries for the index report of an image collection: up to ``count`` of its distinct stored
    captions with a known word (a seeded sample), embedded (eq. 4); None without a model or stored captions (an
    .npz, a folder without captions)."""
    if model is None or collection.kind != "image" or not Path(collection.path).is_dir():
        return None
    from misc.collections.shards import stored_captions

    captions = sorted(set(stored_captions(collection.path)))
    chosen = []
    for row in np.random.default_rng(seed).permutation(len(captions)):
        if model.known_words(captions[row]):
            chosen.append(captions[row])
            if len(chosen) == count:
                break
    if not chosen:
        return None
    features = model.embed_texts(chosen).numpy()
    return features[np.linalg.norm(features, axis=1) > 0.5]


def image_embedding(model: Inference, image: Image.Image | Path, size: int | None) -> np.ndarray:
    """Embedding (1, d) of one image file or decoded image (eq. 1-3), at the collection's size."""
    return model.embed_images([image], size or model.test_size).numpy()


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image, RGB and EXIF-oriented; one that is not an image, or declares more than ``max_pixels``
    (a decompression bomb: a few bytes that would decode to gigabytes), is a :class:`UserError`. The size is read
    from the header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise UserError(f"the image declares {image.width} x {image.height} pixels; at most {max_pixels} "
                                f"are accepted")
            image.load()
    except UserError:
        raise
    except Exception as error:  # whatever PIL raises on a crafted or broken file is the uploader's mistake
        raise UserError(f"the upload is not a readable image ({type(error).__name__})") from error
    return ImageOps.exif_transpose(image).convert("RGB")


def inside_folder(collection: Collection, name: str) -> Path:
    """The file ``name`` (relative to the collection's extracted folder) as a path that is surely inside that
    folder once links are resolved; anything else is a :class:`UserError`."""
    folder = collection.config.get("folder")
    if not folder:
        raise UserError(f"{collection.path} does not record the folder it was extracted from")
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise UserError(f"image {name!r}: not a file inside the collection's folder")
    return path


def box_around_peak(heat: np.ndarray, width: float, height: float,
                    threshold: float = BOX_THRESHOLD) -> list[float]:
    """The box [x0, y0, x1, y1] in image pixels of the connected cells of ``heat`` (h, w) around its peak whose
    value is at least ``threshold`` of the way from the map's minimum to its maximum."""
    from skimage.measure import label

    h, w = heat.shape
    low, high = float(heat.min()), float(heat.max())
    mask = heat >= low + threshold * (high - low) if high > low else np.ones_like(heat, dtype=bool)
    regions = label(mask, connectivity=2)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    rows, cols = np.nonzero(regions == regions[peak])
    return [round(float(c), 2) for c in (cols.min() * width / w, rows.min() * height / h,
                                         (cols.max() + 1) * width / w, (rows.max() + 1) * height / h)]


def localize(model: Inference, collection: Collection, rows: list[int], text: str) -> list[dict[str, Any]]:
    """Where ``text`` is in each image of ``rows`` (eq. 9): the heatmap's peak (x, y) and the box of
    :func:`box_around_peak`, both in the stored image's pixels."""
    found = []
    for row in rows:
        maps = model.heatmaps(inside_folder(collection, str(collection.labels[row])), text)
        width, height = maps.image.size
        peak = [round(float(v), 2) for v in maps.peaks[0]]
        found.append({"peak": peak, "box": box_around_peak(maps.maps[0].numpy(), width, height)})
    return found
