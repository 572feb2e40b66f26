"""A small world of real photos for a real-content test (issue 14): objects cut out of scikit-image's bundled
photos, pasted onto crops of its bundled texture photos, written as one JSON-lines file (misc/data/jsonl.py).

    python photo_world.py data/photos --seed 0 --train 1200 --val 100 --test 500   # the command that writes one

Only photos that ship inside the scikit-image wheel are read (from ``skimage/data``; nothing is downloaded). Each
object's mask is justified on its source photo: a hand-chosen ellipse or rectangle in fractions of the photo (the
cat's head, the saucer under the cup, the rocket on its pad, the astronaut's head and shoulders, the colour disc),
or a threshold (the round coins are brighter than the tray around them, the photographer darker than the sky and
field; the horse is a black silhouette on white). Each scene is a background crop with one or two objects at
random places and scales; its five captions name exactly the objects and the background that are there and, where
they say so, the objects' places (left / right / top / bottom, or one object relative to the other), so they are
honest. ``regions`` hold each object's phrase and the box of its visible pixels; ``segments`` each object's mask
and the background's, as RLE.

Layout under OUT: ``images/<split>/<index>.jpg``, ``photos.jsonl`` (every split, its ``split`` field set) and
``photos.json``, the manifest (version, seed, counts, size) written last.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image

from misc.errors import UserError
from misc.store.files import atomic_path, write_json, writing
from misc.data.images import read_image

VERSION = 1
SIZE = 256
COUNTS = {"train": 1200, "val": 100, "test": 500}
MANIFEST = "photos.json"
FILE = "photos.jsonl"
PHOTOS = Path(skimage.__file__).parent / "data"  # the photos bundled in the wheel (no pooch, no network)

Cut = Callable[[np.ndarray], list[np.ndarray]]  # an RGB photo -> its object masks (one or more instances)


def ellipse(cx: float, cy: float, rx: float, ry: float) -> Cut:
    """The ellipse of centre (cx, cy) and semi-axes (rx, ry), in fractions of the photo's width and height."""
    def cut(photo: np.ndarray) -> list[np.ndarray]:
        h, w = photo.shape[:2]
        y, x = np.mgrid[:h, :w]
        return [((x / w - cx) / rx) ** 2 + ((y / h - cy) / ry) ** 2 <= 1]
    return cut


def rectangle(x0: float, y0: float, x1: float, y1: float) -> Cut:
    """The rectangle from (x0, y0) to (x1, y1), in fractions of the photo's width and height."""
    def cut(photo: np.ndarray) -> list[np.ndarray]:
        h, w = photo.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        mask[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)] = True
        return [mask]
    return cut


def threshold(dark: bool, within: tuple[float, float, float, float] = (0, 0, 1, 1), largest: int = 1,
              min_fraction: float = 0.0, window: int = 0, convex: bool = False) -> Cut:
    """Otsu's threshold of the grey photo (less its mean over a ``window`` x ``window`` neighbourhood when given,
    for uneven lighting) inside the rectangle ``within`` (fractions), dark or bright pixels; its ``largest``
    connected components (holes filled; their convex hulls if ``convex``, for round things) at least
    ``min_fraction`` of the largest one's area."""
    def cut(photo: np.ndarray) -> list[np.ndarray]:
        h, w = photo.shape[:2]
        grey = photo.mean(axis=2)
        if window:
            grey = grey - ndimage.uniform_filter(grey, window)
        x0, y0, x1, y1 = round(within[0] * w), round(within[1] * h), round(within[2] * w), round(within[3] * h)
        inside = grey[y0:y1, x0:x1]
        found = np.zeros((h, w), dtype=bool)
        found[y0:y1, x0:x1] = inside < threshold_otsu(inside) if dark else inside > threshold_otsu(inside)
        labels, count = ndimage.label(ndimage.binary_opening(found, iterations=2))
        areas = ndimage.sum(found, labels, range(1, count + 1))
        keep = [label + 1 for label in np.argsort(areas)[::-1][:largest] if areas[label] >= min_fraction * areas.max()]
        fill = convex_hull_image if convex else ndimage.binary_fill_holes
        return [fill(labels == label) for label in sorted(keep)]
    return cut


@dataclass(frozen=True)
class Thing:
    """An object: its category (segments), the phrases that name it (captions, regions), its photo and cut."""

    category: str
    phrases: tuple[str, ...]
    photo: str
    cut: Cut


@dataclass(frozen=True)
class Ground:
    """A background: its category, the phrases that put something on it ("on grass"), its texture photo."""

    category: str
    places: tuple[str, ...]
    photo: str


THINGS = (
    Thing("cat", ("a cat", "a tabby cat", "a cat's face"), "chelsea.png", ellipse(0.5, 0.5, 0.42, 0.5)),
    Thing("cup", ("a cup of coffee", "a coffee cup", "an espresso cup on a saucer"), "coffee.png",
          ellipse(0.46, 0.57, 0.34, 0.41)),
    Thing("rocket", ("a rocket", "a rocket on its launch pad", "a space rocket"), "rocket.jpg",
          rectangle(0.44, 0.25, 0.57, 0.95)),
    Thing("astronaut", ("an astronaut", "a woman in a space suit", "a smiling astronaut"), "astronaut.png",
          ellipse(0.32, 0.52, 0.32, 0.5)),
    Thing("coin", ("a coin", "an old coin", "a silver coin"), "coins.png",
          threshold(dark=False, largest=24, min_fraction=0.3, window=61, convex=True)),
    Thing("horse", ("a horse", "a black horse", "the silhouette of a horse"), "horse.png", threshold(dark=True)),
    Thing("photographer", ("a photographer", "a man with a camera", "a man taking a photo"), "camera.png",
          threshold(dark=True, within=(0.0, 0.15, 0.7, 1.0))),
    Thing("wheel", ("a colour wheel", "a colourful disc", "a wheel of colours"), "color.png",
          ellipse(0.5, 0.5, 0.5, 0.5)),
)
GROUNDS = (
    Ground("grass", ("on grass", "on the grass", "on a lawn"), "grass.png"),
    Ground("gravel", ("on gravel", "on small stones", "on a gravel path"), "gravel.png"),
    Ground("bricks", ("on bricks", "on a brick wall", "against a wall of bricks"), "brick.png"),
    Ground("moon", ("on the moon", "on the surface of the moon", "on a lunar surface"), "moon.png"),
    Ground("space", ("in space", "among stars and galaxies", "in front of the night sky"), "hubble_deep_field.jpg"),
    Ground("page", ("on a page of text", "on printed paper", "on a printed page"), "page.png"),
)


@dataclass
class Placed:
    """An object in a scene: its thing, its phrase, its visible mask (size x size) and that mask's box."""

    thing: Thing
    phrase: str
    mask: np.ndarray

    @property
    def box(self) -> list[int]:
        ys, xs = np.nonzero(self.mask)
        return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as (H, W, 3) uint8, decoded by the project's one decoder."""
    return np.asarray(read_image(PHOTOS / name))


def cut_outs() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Each category's instances: (RGB crop, boolean mask) cropped to the mask's box."""
    found = {}
    for thing in THINGS:
        photo = load_photo(thing.photo)
        pieces = []
        for mask in thing.cut(photo):
            ys, xs = np.nonzero(mask)
            box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
            pieces.append((photo[box], mask[box]))
        found[thing.category] = pieces
    return found


def where(placed: Placed, size: int) -> str:
    """Where one object is in the image, in words."""
    x, y = placed.centre
    across = "on the left" if x < 0.4 * size else "on the right" if x > 0.6 * size else ""
    down = "at the top" if y < 0.4 * size else "at the bottom" if y > 0.6 * size else ""
    return " ".join(word for word in (down, across) if word) or "in the middle"


def relation(first: Placed, second: Placed) -> str:
    """Where ``first`` is relative to ``second``, along the axis where their centres differ more."""
    (x1, y1), (x2, y2) = first.centre, second.centre
    if abs(x1 - x2) >= abs(y1 - y2):
        return "on the left of" if x1 < x2 else "on the right of"
    return "above" if y1 < y2 else "below"


def captions(rng: np.random.Generator, placed: list[Placed], ground: Ground, size: int) -> list[str]:
    """Five honest captions of a scene: every object named (by a phrase of its own); the background named in two,
    so that the objects, not the texture around them, carry most of what tells images apart."""
    def name(item: Placed) -> str:
        return str(rng.choice(item.thing.phrases))

    def place() -> str:
        return str(rng.choice(ground.places))

    if len(placed) == 1:
        item = placed[0]
        return [name(item), f"{name(item)} {where(item, size)}", f"{name(item)} {place()}",
                f"a photo of {name(item)} {where(item, size)}", f"{name(item)} {where(item, size)} {place()}"]
    first, second = placed
    return [f"{name(first)} and {name(second)}", f"{name(first)} {relation(first, second)} {name(second)}",
            f"{name(second)} {relation(second, first)} {name(first)} {place()}",
            f"a photo of {name(second)} and {name(first)}", f"{name(first)} and {name(second)} {place()}"]


def background(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """A random square crop of a texture photo (half of its shorter side or more), resized to size x size."""
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop).copy()


def paste(rng: np.random.Generator, canvas: np.ndarray, piece: tuple[np.ndarray, np.ndarray], longest: int,
          taken: np.ndarray) -> np.ndarray | None:
    """Paste an instance (flipped at random) scaled to ``longest`` pixels on its longer side at a random place
    where it overlaps the ``taken`` pixels (the object already there) by at most a tenth of either; its mask, or
    None when no place fits in 20 tries."""
    pixels, mask = piece
    if rng.random() < 0.5:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    scale = longest / max(mask.shape)
    w, h = max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale))
    pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((w, h), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize((w, h), Image.NEAREST))
    size = canvas.shape[0]
    for _ in range(20):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        full = np.zeros((size, size), dtype=bool)
        full[y:y + h, x:x + w] = mask
        if (full & taken).sum() <= 0.1 * min(full.sum(), taken.sum() if taken.any() else full.sum()):
            canvas[full] = pixels[mask]
            return full
    return None


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def scene(rng: np.random.Generator, pieces: dict, grounds: dict, size: int) -> tuple[np.ndarray, dict]:
    """One image and its JSON line (without image and split): one or two objects of different categories."""
    ground = GROUNDS[int(rng.integers(len(GROUNDS)))]
    canvas = background(rng, grounds[ground.category], size)
    count = 1 if rng.random() < 0.5 else 2
    things = [THINGS[int(i)] for i in rng.choice(len(THINGS), size=count, replace=False)]
    placed: list[Placed] = []
    taken = np.zeros((size, size), dtype=bool)
    for thing in things:
        instances = pieces[thing.category]
        longest = round(size * (rng.uniform(0.3, 0.5) if count == 1 else rng.uniform(0.25, 0.4)))
        mask = paste(rng, canvas, instances[int(rng.integers(len(instances)))], longest, taken)
        if mask is None:
            continue
        for earlier in placed:
            earlier.mask &= ~mask  # what the new object hides is no longer the earlier one's
        placed.append(Placed(thing, str(rng.choice(thing.phrases)), mask))
        taken |= mask
    line = {"captions": captions(rng, placed, ground, size),
            "regions": [{"phrase": item.phrase, "box": item.box} for item in placed],
            "segments": [{"category": item.thing.category, "rle": rle(item.mask)} for item in placed]
            + [{"category": ground.category, "rle": rle(~taken)}]}
    return canvas, line


def manifest(seed: int, counts: dict[str, int], size: int) -> dict:
    return {"version": VERSION, "seed": seed, "counts": dict(counts), "size": size}


def generate(out: Path, seed: int = 0, counts: dict[str, int] | None = None, size: int = SIZE) -> Path:
    """Write a photo world to ``out`` and return its JSON-lines file. Deterministic per seed: image ``i`` of a
    split depends on (seed, split, i) only. Built in a sibling temporary folder and renamed into place, its
    manifest written last; ``out`` must be empty or missing, or already hold this very world (then kept as is)."""
    out = Path(out)
    counts = dict(COUNTS if counts is None else counts)
    wanted = manifest(seed, counts, size)
    if out.exists() and any(out.iterdir()):
        marker = out / MANIFEST
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == wanted:
            return out / FILE
        raise UserError(f"{out} is not empty and holds no photo world of seed {seed}, counts {counts}, size {size}: "
                        f"choose an empty folder or remove it")
    if size < 64 or any(not isinstance(n, int) or n < 0 for n in counts.values()) or not any(counts.values()):
        raise UserError(f"a photo world needs size >= 64 and image counts >= 0 (not all 0), got {size}, {counts}")
    pieces = cut_outs()
    grounds = {ground.category: load_photo(ground.photo) for ground in GROUNDS}
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        lines = []
        for number, (split, count) in enumerate(counts.items()):
            (work / "images" / split).mkdir(parents=True)
            for index in range(count):
                pixels, line = scene(np.random.default_rng([seed, number, index]), pieces, grounds, size)
                name = f"images/{split}/{index:05d}.jpg"
                Image.fromarray(pixels).save(work / name, quality=90)
                lines.append(json.dumps({"image": name, "split": split, **line}))
        with atomic_path(work / FILE) as temporary:
            temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_json(work / MANIFEST, wanted)
        with writing(out):
            if out.exists():
                out.rmdir()
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out / FILE

