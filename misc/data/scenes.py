"""The demo world's scenes (misc/data/demo.py writes them to disk): 1-3 non-overlapping objects (shape x colour x size)
anywhere in the frame, their five captions, region phrases and pixels.

The captions name the objects with their attributes, where they are (position words from the object's box) and how
they relate (relations from the boxes of two objects), so every spatial word is true of the drawn geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]  # COCO category ids 1..6 in this order
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 50), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (150, 40, 190), "orange": (245, 140, 30)}
SIZES = {"small": (0.18, 0.24), "large": (0.34, 0.45)}  # side of the object's square cell / image side

SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"], "star": ["star"],
               "cross": ["cross", "plus sign"], "diamond": ["diamond", "rhombus"]}
COLOUR_WORDS = {"red": ["red"], "green": ["green"], "blue": ["blue"], "yellow": ["yellow"],
                "purple": ["purple", "violet"], "orange": ["orange"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
POSITION_PHRASES = {
    "centre": ["in the middle", "in the centre", "in the center"],
    "top": ["at the top", "near the top"], "bottom": ["at the bottom", "near the bottom"],
    "left": ["on the left", "on the left side"], "right": ["on the right", "on the right side"],
    "top left": ["in the top left corner", "in the upper left corner", "at the top left"],
    "top right": ["in the top right corner", "in the upper right corner", "at the top right"],
    "bottom left": ["in the bottom left corner", "in the lower left corner", "at the bottom left"],
    "bottom right": ["in the bottom right corner", "in the lower right corner", "at the bottom right"],
}
RELATION_PHRASES = {"left of": ["to the left of", "left of"], "right of": ["to the right of", "right of"],
                    "above": ["above", "over"], "below": ["below", "under", "beneath"]}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
GAP = 2  # pixels kept free between the cells of two objects



@dataclass(frozen=True)
class DemoObject:
    """One drawn object: its attributes and the square cell (x, y, side) in pixels that holds it."""
    shape: str
    colour: str
    size: str
    x: int
    y: int
    side: int

    @cached_property
    def polygon(self) -> list[tuple[float, float]]:
        """Outline in pixel coordinates; drawing, masks and COCO polygons all come from it."""
        return shape_polygon(self.shape, self.x, self.y, self.side)

    @cached_property
    def bbox(self) -> list[float]:
        """Tight box [x, y, w, h] of the outline, as in COCO."""
        xs, ys = zip(*self.polygon)
        return [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def shape_polygon(shape: str, x: float, y: float, side: float) -> list[tuple[float, float]]:
    """Vertices of `shape` inscribed in the square cell of corner (x, y) and width `side`."""
    r = side / 2
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "square":
        unit = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)])
    elif shape == "triangle":
        unit = np.array([(0, -1), (1, 1), (-1, 1)])
    elif shape == "diamond":
        unit = np.array([(0, -1), (1, 0), (0, 1), (-1, 0)])
    elif shape == "star":  # five points, the first pointing up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        unit = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "cross":  # plus sign, arms a third of the side wide
        t = 1 / 3
        unit = np.array([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
                         (-1, -t), (-t, -t)])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [tuple(p) for p in np.round(unit * r + (x + r, y + r), 2).tolist()]


def position_word(bbox: list[float], image_size: int) -> str:
    """Where a box [x, y, w, h] lies, from its centre in thirds of the image: 'top left', 'top', ..., 'centre'."""
    cx, cy = bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2
    vertical = "top" if cy < image_size / 3 else "bottom" if cy > 2 * image_size / 3 else ""
    horizontal = "left" if cx < image_size / 3 else "right" if cx > 2 * image_size / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def relation(a: list[float], b: list[float]) -> str:
    """How box a lies relative to disjoint box b: 'left of', 'right of', 'above' or 'below' (the widest gap)."""
    gaps = {"left of": b[0] - (a[0] + a[2]), "right of": a[0] - (b[0] + b[2]),
            "above": b[1] - (a[1] + a[3]), "below": a[1] - (b[1] + b[3])}
    word = max(gaps, key=gaps.__getitem__)
    if gaps[word] <= 0:
        raise ValueError(f"boxes {a} and {b} overlap")
    return word


def side_by_side(a: list[float], b: list[float]) -> bool:
    """True when the vertical extents of two boxes overlap, so that 'next to' is fair for a left/right pair."""
    return a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def sample_scene(rng: np.random.Generator, image_size: int) -> list[DemoObject]:
    """1-3 objects with uniform positions over the whole image; a cell touching an earlier one is re-drawn."""
    objects: list[DemoObject] = []
    for _ in range(int(rng.integers(1, 4))):
        shape, colour, size = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES)))
        side = int(round(rng.uniform(*SIZES[size]) * image_size))
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            if all(x >= o.x + o.side + GAP or o.x >= x + side + GAP or y >= o.y + o.side + GAP
                   or o.y >= y + side + GAP for o in objects):
                objects.append(DemoObject(shape, colour, size, x, y, side))
                break
    return objects


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Mention:
    """A noun phrase of a caption and the objects it names (by index in the scene); none for the background."""
    text: str
    objects: tuple[int, ...]


Segment = str | Mention  # a caption is a list of segments: plain text and mentions


def caption_text(segments: list[Segment]) -> str:
    """The caption a list of segments spells."""
    return "".join(s.text if isinstance(s, Mention) else s for s in segments)


def _mention(rng: np.random.Generator, objects: list[DemoObject], index: int, image_size: int,
             where: bool) -> list[Segment]:
    """'a big red circle', with its position phrase when `where`; the size word is left out now and then."""
    obj = objects[index]
    words = [_pick(rng, SIZE_WORDS[obj.size])] if rng.random() < 0.85 else []
    words += [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    mention = Mention(_with_article(" ".join(words)), (index,))
    return [mention, f" {_pick(rng, POSITION_PHRASES[position_word(obj.bbox, image_size)])}"] if where else [mention]


def _join(parts: list[list[Segment]]) -> list[Segment]:
    joined = list(parts[0])
    for number, part in enumerate(parts[1:], start=2):
        joined += [" and " if number == len(parts) else ", ", *part]
    return joined


def _capitalised(segments: list[Segment]) -> list[Segment]:
    first = segments[0]
    text = first.text if isinstance(first, Mention) else first
    text = text[0].upper() + text[1:]
    return [Mention(text, first.objects) if isinstance(first, Mention) else text, *segments[1:]]


def _caption(rng: np.random.Generator, style: str, objects: list[DemoObject], image_size: int) -> list[Segment]:
    """One caption as segments: 'list' and 'count' name every object with its position, 'relation' relates the
    first two (and places a third), 'short' names a single object."""
    order = [int(i) for i in rng.permutation(len(objects))]
    n = len(order)
    if style == "list":
        segments: list[Segment] = [_pick(rng, ["", "an image of ", "a picture of ", "a drawing of ", "there is "])]
        segments += _join([_mention(rng, objects, i, image_size, True) for i in order])
        if rng.random() < 0.3:
            segments += [" on ", Mention(f"a {_pick(rng, ['textured', 'mottled', 'noisy'])} background", ())]
    elif style == "count":
        head = Mention(f"{COUNT_WORDS[n]} {_pick(rng, ['shape', 'object'])}{'s' if n > 1 else ''}", tuple(order))
        segments = [_pick(rng, ["", f"there {'are' if n > 1 else 'is'} "]), head, ": "]
        segments += _join([_mention(rng, objects, i, image_size, True) for i in order])
    elif style == "relation":
        a, b = objects[order[0]], objects[order[1]]
        word = relation(a.bbox, b.bbox)
        options = RELATION_PHRASES[word] + (["next to", "beside"] if word in ("left of", "right of")
                                            and side_by_side(a.bbox, b.bbox) else [])
        segments = _mention(rng, objects, order[0], image_size, False)
        segments += [f" {_pick(rng, options)} ", *_mention(rng, objects, order[1], image_size, False)]
        if n == 3:
            segments += [" and ", *_mention(rng, objects, order[2], image_size, True)]
    else:
        segments = _mention(rng, objects, order[0], image_size, rng.random() < 0.5)
        if n > 1:
            among = _pick(rng, [" among ", " with ", ""])
            segments += [among, Mention("other shapes", tuple(order[1:]))] if among else []
    segments = _capitalised([s for s in segments if s != ""])
    return segments + (["."] if rng.random() < 0.5 else [])


def describe_segments(rng: np.random.Generator, objects: list[DemoObject], image_size: int) -> list[list[Segment]]:
    """Five captions as segments (:func:`caption_text` spells them); four name every object, the last ('short')
    may name only one."""
    several = len(objects) > 1
    styles = ["list", "count", "relation" if several else "list",
              _pick(rng, ["list", "count", "relation"] if several else ["list", "count"]), "short"]
    return [_caption(rng, style, objects, image_size) for style in styles]


def describe(rng: np.random.Generator, objects: list[DemoObject], image_size: int) -> list[str]:
    """Five captions; four name every object, the last ('short') may name only one."""
    return [caption_text(segments) for segments in describe_segments(rng, objects, image_size)]


def region_phrase(rng: np.random.Generator, obj: DemoObject) -> str:
    """A Visual Genome style phrase for one object, e.g. 'the small red circle'."""
    size, colour, shape = (_pick(rng, words[key]) for words, key in
                           ((SIZE_WORDS, obj.size), (COLOUR_WORDS, obj.colour), (SHAPE_WORDS, obj.shape)))
    return _pick(rng, [_with_article(f"{size} {colour} {shape}"), f"the {size} {colour} {shape}",
                       f"{size} {colour} {shape}", f"{colour} {shape}"])


def flat_polygon(polygon: list[tuple[float, float]]) -> list[float]:
    """A polygon as COCO writes it: x1, y1, x2, y2, ..."""
    return [v for point in polygon for v in point]


def render(rng: np.random.Generator, objects: list[DemoObject], image_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw the objects on a smooth muted random background with grain; returns the RGB image and one
    boolean mask per object (exactly the pixels painted with its colour)."""
    grid = int(rng.integers(3, 7))
    cells = rng.uniform(70, 180, size=3) + rng.normal(0, 30, size=(grid, grid, 3))
    grey = cells.mean(axis=2, keepdims=True)
    cells = np.clip(grey + 0.25 * (cells - grey), 0, 255).astype(np.uint8)  # desaturated: objects stand out
    pixels = np.array(Image.fromarray(cells).resize((image_size, image_size), Image.BICUBIC), dtype=np.float32)
    masks = []
    for obj in objects:
        # pycocotools' own rasterisation: the painted pixels are exactly what annToMask gives for the polygon
        rle = mask_utils.frPyObjects([flat_polygon(obj.polygon)], image_size, image_size)
        mask = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        pixels[mask] = np.array(COLOURS[obj.colour]) + rng.uniform(-12, 12, size=3)
        masks.append(mask)
    pixels += 5 * rng.standard_normal((image_size, image_size, 1), dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8), masks
