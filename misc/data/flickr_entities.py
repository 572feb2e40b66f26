"""Flickr30K Entities (Plummer et al., IJCV 2017): phrases of the Flickr30k captions linked to boxes, in the
dataset's own formats (config key ``flickr_entities``; images: ``flickr_images``/<id>.jpg).

    Sentences/<id>.txt    one caption a line, its phrases in brackets with their coreference chain id and types:
                          ``[/EN#18/people A man] with [/EN#19/bodyparts pierced ears] ...``; chain 0 is ``notvisual``
    Annotations/<id>.xml  PASCAL VOC-like: the image size and one <object> per box (xmin..xmax, ymin..ymax 1-based
                          and inclusive) or per scene / no-box flag, each naming the chain ids it belongs to in one or
                          more <name> tags (a box can serve several chains)
    train.txt, val.txt, test.txt   the image ids of the standard splits

Boxes are returned as (x, y, width, height) in the continuous pixel frame of misc/eval/localization.py (pixel p covers
[p, p + 1)): 1-based inclusive xmin..xmax becomes x = xmin - 1, width = xmax - xmin + 1.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from misc import config
from misc.data.spans import Caption
from misc.errors import UserError

ENTITY_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other")
NOT_VISUAL = "0"  # the chain id of every "notvisual" phrase: never annotated
SPLITS = ("train", "val", "test")
DATASET = "flickr30k_entities"  # the training dataset of the split files (misc.data.datasets.load_records)
PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s/\]]+)+)\s+([^\]]*)\]")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Phrase:
    """A bracketed phrase: its words, chain id, position (index of its first word) in the sentence and types."""

    text: str
    entity: str
    first_word: int
    types: tuple[str, ...] = ()  # coarse categories: ENTITY_TYPES, or notvisual


@dataclass(frozen=True)
class Sentence:
    text: Caption  # the caption's words, brackets removed, with the characters of each bracketed phrase
    phrases: tuple[Phrase, ...]


@dataclass
class Annotation:
    """An image's size and, per chain id, its boxes, and the chains flagged scene or no-box."""

    width: int
    height: int
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    scene: set[str] = field(default_factory=set)
    nobox: set[str] = field(default_factory=set)


@dataclass
class EntitiesImage:
    image_id: str
    path: Path
    sentences: list[Sentence]
    annotation: Annotation


def parse_sentence(line: str) -> Sentence:
    """One line of a Sentences file; text outside brackets, or a bracket without a chain, is plain words. The text
    is a :class:`misc.data.spans.Caption` holding its bracketed phrases (``model.text_units: phrases``)."""
    words: list[str] = []
    phrases = []
    position = 0
    for match in PHRASE.finditer(line):
        words += line[position:match.start()].split()
        inside = match[3].split()
        phrases.append(Phrase(" ".join(inside), match[1], len(words), tuple(match[2].strip("/").split("/"))))
        words += inside
        position = match.end()
    words += line[position:].split()
    starts = [sum(len(word) + 1 for word in words[:p.first_word]) for p in phrases]  # words joined by one space
    return Sentence(Caption(" ".join(words), [(start, start + len(p.text)) for start, p in zip(starts, phrases)
                                              if p.text]), tuple(phrases))


def read_sentences(path: Path) -> list[Sentence]:
    """Every caption of a Sentences/<id>.txt file."""
    return [parse_sentence(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_annotation(path: Path) -> Annotation:
    """An Annotations/<id>.xml file (read with the standard library's ElementTree)."""
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        annotation = Annotation(int(size.findtext("width")), int(size.findtext("height")))
        for obj in root.iter("object"):
            names = [name.text.strip() for name in obj.findall("name")]
            box = obj.find("bndbox")
            if box is not None:
                xmin, ymin, xmax, ymax = (int(float(box.findtext(key))) for key in ("xmin", "ymin", "xmax", "ymax"))
                for name in names:
                    annotation.boxes.setdefault(name, []).append(
                        (xmin - 1.0, ymin - 1.0, float(xmax - xmin + 1), float(ymax - ymin + 1)))
                continue
            for name in names:
                if int(obj.findtext("scene", "0")) > 0:
                    annotation.scene.add(name)
                if int(obj.findtext("nobndbox", "0")) > 0:
                    annotation.nobox.add(name)
    except (ET.ParseError, AttributeError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a Flickr30K Entities annotation file ({error}) "
                        f"(config key 'flickr_entities')") from None
    return annotation


def entity_boxes(annotation: Annotation, entity: str, scene_as_image: bool = False) -> tuple[list[Box], str | None]:
    """The boxes of a chain, or none and why: ``not visual`` (chain 0), ``scene`` (flagged scene, no box; with
    ``scene_as_image`` the whole image is its box), ``no box`` (flagged), ``not annotated`` (no object names it)."""
    if entity == NOT_VISUAL:
        return [], "not visual"
    if annotation.boxes.get(entity):
        return annotation.boxes[entity], None
    if entity in annotation.scene:
        whole = (0.0, 0.0, float(annotation.width), float(annotation.height))
        return ([whole], None) if scene_as_image else ([], "scene")
    return [], "no box" if entity in annotation.nobox else "not annotated"


def read_split(root: Path, split: str) -> list[str]:
    """The image ids of a standard split file (train.txt, val.txt, test.txt)."""
    if split not in SPLITS:
        raise UserError(f"Flickr30K Entities split {split!r}: choose one of {', '.join(SPLITS)}")
    path = config.required_file("flickr_entities", root, f"{split}.txt")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_images(root: Path, images: Path, split: str, limit: int | None = None) -> list[EntitiesImage]:
    """The images of a split with their sentences and annotations; ``limit`` keeps the first ones."""
    ids = read_split(root, split)
    loaded = []
    for image_id in ids[:limit] if limit is not None else ids:
        sentences = read_sentences(config.required_file("flickr_entities", root / "Sentences", f"{image_id}.txt"))
        annotation = read_annotation(config.required_file("flickr_entities", root / "Annotations",
                                                          f"{image_id}.xml"))
        loaded.append(EntitiesImage(image_id, images / f"{image_id}.jpg", sentences, annotation))
    return loaded


def caption_records(split: str) -> list[tuple[Path, list[str], int]]:
    """(image path, captions, image id) of each image of a split file, its captions those of Sentences/<id>.txt
    without the bracket markup; for training on the Entities splits (``--dataset flickr30k_entities``)."""
    root, images = config.path("flickr_entities"), config.path("flickr_images")
    records = []
    for image_id in read_split(root, split):
        sentences = read_sentences(config.required_file("flickr_entities", root / "Sentences", f"{image_id}.txt"))
        records.append((images / f"{image_id}.jpg", [s.text for s in sentences if s.text], int(image_id)))
    return records


def check_test_overlap(image_ids: list[str], dataset: str) -> None:
    """Refuse, in one line, training images (ids = file stems) of ``dataset`` that are in the Flickr30K Entities
    test split file, when that file is configured: Karpathy's flickr30k train split holds some of them."""
    test_file = config.path("flickr_entities", must_exist=False) / "test.txt"
    if not test_file.is_file():
        return
    shared = sorted(set(read_split(test_file.parent, "test")).intersection(image_ids))
    if shared:
        raise UserError(f"training on {dataset}: {len(shared)} of its training images are in the Flickr30K Entities "
                        f"test split {test_file}, e.g. {shared[0]}; train on --dataset {DATASET} --split train, or "
                        f"pass --set train.allow_test_overlap=true to train on them anyway")


# --------------------------------------------------------------------------- writing (the demo world)

def format_phrase(entity: str, types: tuple[str, ...], text: str) -> str:
    """A phrase as the Sentences files bracket it."""
    return f"[/EN#{entity}/{'/'.join(types)} {text}]"


def annotation_xml(filename: str, width: int, height: int, boxes: list[tuple[list[str], Box]],
                   scene: list[str], nobox: list[str]) -> str:
    """An Annotations file: each box (x, y, width, height) with the chains it serves, then the scene and no-box
    flags, with the dataset's 1-based inclusive pixel coordinates."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for names, (x, y, w, h) in boxes:
        obj = ET.SubElement(root, "object")
        for name in names:
            ET.SubElement(obj, "name").text = name
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(bndbox, key).text = str(int(value))
    for name in sorted(set(scene) | set(nobox)):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "nobndbox").text = str(int(name in nobox))
        ET.SubElement(obj, "scene").text = str(int(name in scene))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"
