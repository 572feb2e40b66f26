"""Listing and decoding images: the one decoder every command uses.

- Listing: the images of a folder (recursive) or of a list file, as stable relative paths.
- Decoding: one policy for every odd file (see :func:`decode_image`); a file that cannot be decoded raises, and
  callers that process many user files turn that into a reported skip (:func:`failure_reason`).
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from misc.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
EXIF_ORIENTATION = 274  # the EXIF tag that says how a photo is turned
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a browser shows them


# --------------------------------------------------------------------------- listing

def list_images(folder: Path) -> list[str]:
    """Relative POSIX paths of every image under ``folder`` (recursive; extensions in :data:`IMAGE_EXTENSIONS`,
    any case), sorted. Symbolic links to folders are not followed (no cycles)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found")
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def read_list(list_file: Path, folder: Path) -> list[str]:
    """Entries of a list file, one path a line, relative to ``folder`` or absolute, in the file's order.

    Absolute paths inside ``folder`` are made relative to it; blank lines and repeated entries are dropped.
    Files that do not exist are kept: they are reported as skipped like any undecodable file.
    """
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"list file {list_file} could not be read ({error})") from error
    folder = Path(folder).resolve()
    entries: dict[str, None] = {}  # ordered set
    repeated = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        path = Path(line.strip())
        if path.is_absolute() and path.resolve().is_relative_to(folder):
            path = path.resolve().relative_to(folder)
        repeated += path.as_posix() in entries
        entries[path.as_posix()] = None
    if repeated:
        log.warning("%s: dropped %d repeated entries", list_file, repeated)
    return list(entries)


def utf8_name(entry: str) -> bool:
    """Whether a listed path is valid UTF-8 (the OS may hand out any bytes; Python keeps the rest as surrogates)."""
    try:
        entry.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(entry: str) -> str:
    """A listed path as text, its bytes that are not UTF-8 written as ``\\xNN``."""
    return entry.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- decoding

def decode_image(path: Path | str | bytes, size: int | None = None, *, exif: bool = True) -> Image.Image:
    """Decode any image file (or the bytes of one, e.g. a tar member) into RGB, ready to be resized to ``size`` x
    ``size``; raise on undecodable files.

    Policy:
    - with ``size``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least ``size`` on both
      sides (``Image.draft``): a 40-megapixel photo costs little memory and time. Without it, at full scale, as the
      original release decoded its datasets (evaluation protocols keep that);
    - with ``exif``, the EXIF orientation is applied, as a photo viewer shows the picture. Annotated datasets
      (COCO, Visual Genome) pass ``exif=False``: their boxes and masks are drawn on the stored pixels;
    - 16-bit grey (``I;16``, ``I``) is scaled to 8 bits (value / 257), not clipped;
    - transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited onto white;
    - CMYK, grey, palette and bilevel images are converted by PIL;
    - empty files, unknown formats and truncated files raise; so do images above PIL's decompression-bomb limit
      (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels), which PIL refuses before decoding anything.
    """
    source = io.BytesIO(path) if isinstance(path, bytes) else Path(path)
    if (len(path) if isinstance(path, bytes) else source.stat().st_size) == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Between MAX_IMAGE_PIXELS and twice that PIL only warns; such images are decoded (JPEGs at reduced scale).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            if size is not None:
                image.draft(image.mode, (size, size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image) if exif else image)


def shown_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of an image file as a photo viewer shows it (its EXIF orientation applied), from its header
    alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # as in decode_image
        with Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn swaps the sides
            return (image.height, image.width) if turned else image.size


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a decoded image, following the policy of :func:`decode_image`."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.rint(np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def oriented(image: Image.Image) -> Image.Image:
    """An image a caller already opened, made as :func:`decode_image` makes a photo: EXIF orientation applied,
    then RGB by the same policy."""
    return to_rgb(ImageOps.exif_transpose(image))


def failure_reason(error: Exception) -> str:
    """One line saying why a file was skipped."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def unreadable(path: Path | str, side: int = 32) -> str | None:
    """Why the image file cannot be used, or None: it is decoded at a reduced size (a JPEG at 1/8 scale, so the
    whole file is read but little is computed), which finds what a header check misses, e.g. a JPEG cut short."""
    try:
        decode_image(path, side, exif=False)
    except Exception as error:  # any failure to decode the file means the same: the image cannot be used
        return failure_reason(error)
    return None


def read_image(path: Path | str, size: int | None = None) -> Image.Image:
    """:func:`decode_image` for one file a user named (a photo: EXIF orientation applied); a file that cannot be
    decoded is a one-line error naming it."""
    try:
        return decode_image(path, size)
    except Exception as error:  # any failure to decode the user's file is reported in one line
        raise UserError(f"{path}: cannot read it as an image ({failure_reason(error)})") from error
