"""Image-caption data: Karpathy splits (COCO, Flickr30k, the demo world), custom JSON-lines files (read by
misc/data/jsonl.py), the torch datasets, transforms and collation shared by training and evaluation, and the
localization data: Visual Genome regions of COCO images and COCO instance masks."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import transforms
from visual_genome import local as vg_local
from visual_genome import utils as vg_utils

from misc import config
from misc.data import demo, flickr_entities
from misc.config import EVAL_PROTOCOLS, TrainConfig
from misc.data.jsonl import split_entries
from misc.errors import UserError, did_you_mean
from misc.data.decoded import Unreadable, try_decode
from misc.data.images import unreadable
from misc.data.words import Encoded, WordVectors, tokenize

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = {"train": ("train",), "restval": ("restval",), "trainrv": ("train", "restval"), "val": ("val",),
          "test": ("test",)}
DATASET_KEYS = {"coco": ("coco_images", "coco_karpathy"), "demo": ("coco_images", "coco_karpathy"),
                "flickr30k": ("flickr_images", "flickr_karpathy")}
# The datasets the demo world holds: "demo" (its Karpathy, COCO and Visual Genome files) and "demo_entities" (its
# Flickr30K Entities files, for the pointing game).
DEMO_DATASETS = ("demo", "demo_entities")


@dataclass
class Record:
    """One image and its captions."""

    image: Path
    captions: list[str]
    image_id: int


def karpathy_records(json_path: Path, images_root: Path, split: str) -> list[Record]:
    """Images of a Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``).

    ``split`` is train, restval, val, test or trainrv (train + restval). Captions with no words are skipped
    and counted; an image left with no caption is dropped, with a warning either way.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    try:
        entries = json.loads(Path(json_path).read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{json_path}: not a Karpathy split file ({error})") from error
    records, empty = [], 0
    for entry in entries:
        if entry.get("split") not in SPLITS[split]:
            continue
        captions = [s["raw"] for s in entry["sentences"] if tokenize(s["raw"])]
        empty += len(entry["sentences"]) - len(captions)
        if captions:
            folder = images_root / entry["filepath"] if "filepath" in entry else images_root
            records.append(Record(folder / entry["filename"], captions, int(entry.get("cocoid", entry["imgid"]))))
    if empty:
        log.warning("%s: skipped %d captions with no words", json_path, empty)
    if not records:
        raise UserError(f"{json_path}: no image with captions in split {split!r}")
    return records


def custom_records(path: Path, split: str) -> tuple[list[Record], Unreadable]:
    """The images of ``split`` of a custom JSON-lines file (misc/data/jsonl.py) whose image decodes, and those
    left out; captions with no words are skipped and counted."""
    records = []
    for entry in split_entries(path, split):
        kept = [c for c in entry.captions if tokenize(c)]
        if len(kept) < len(entry.captions):
            log.warning("%s:%d: skipped %d captions with no words", path, entry.line, len(entry.captions) - len(kept))
        if kept:
            records.append(Record(entry.image, kept, entry.line))
    if not records:
        raise UserError(f"{path}: no image with captions in split {split!r}")
    return readable_records(records, path)


def is_custom(dataset: str) -> bool:
    """Whether ``dataset`` names a custom JSON-lines file rather than a built-in dataset."""
    return dataset not in DATASET_KEYS and Path(dataset).is_file()


def load_records(dataset: str, split: str) -> list[Record]:
    """The usable records of :func:`load_split`."""
    return load_split(dataset, split)[0]


def load_split(dataset: str, split: str) -> tuple[list[Record], Unreadable]:
    """Records of a named dataset (coco, flickr30k, demo, flickr30k_entities: a split file with its Sentences/) or a
    JSON-lines file, and the images left out as undecodable (one's own are decoded ahead, named ones only found: a
    named dataset's image that fails is met where it is decoded, misc/data/decoded.py)."""
    if dataset == flickr_entities.DATASET:
        records = [Record(*entry) for entry in flickr_entities.caption_records(split)]
        check_images(records, "flickr_images")
        return records, []
    if dataset not in DATASET_KEYS:
        if is_custom(dataset):
            return custom_records(Path(dataset), split)
        raise UserError(f"unknown dataset {dataset!r}{did_you_mean(dataset, DATASET_KEYS)}: use coco, flickr30k, "
                        f"flickr30k_entities, demo or a JSON-lines file (data/README.md)")
    images_key, split_key = DATASET_KEYS[dataset]
    demo = dataset == "demo"
    records = karpathy_records(config.path(split_key, demo=demo), config.path(images_key, demo=demo), split)
    check_images(records, images_key)
    return records, []


def check_images(records: list[Record], key: str = "") -> None:
    missing = [r.image for r in records if not r.image.exists()]
    if missing:
        where = f" (config key '{key}')" if key else ""
        raise UserError(f"{len(missing)} of {len(records)} images are missing, e.g. {missing[0]}{where}")


def readable_records(records: list[Record], source: Path) -> tuple[list[Record], Unreadable]:
    """The records whose image decodes (:func:`misc.data.images.unreadable`) and the others, logged before anything
    runs (missing, not an image, truncated); :class:`PairDataset` still replaces any that fails later in training."""
    kept, skipped = [], []
    for record in records:
        reason = unreadable(record.image)
        if reason is None:
            kept.append(record)
        else:
            skipped.append((str(record.image), reason))
    if skipped:
        log.warning("%s: skipped %d of %d images that cannot be read, e.g. %s (%s)", source, len(skipped),
                    len(records), *skipped[0])
    if not kept:
        raise UserError(f"{source}: none of its {len(records)} images can be read, e.g. {': '.join(skipped[0])}")
    return kept, skipped


def prepare_dataset(dataset: str) -> None:
    """Make ``dataset`` ready for its first use, the one step where the demo world is written: for one of
    :data:`DEMO_DATASETS`, :func:`misc.data.demo.ensure` writes the world to ``config.DEMO_DIR`` unless it already
    holds one, so that every command runs on a fresh clone with no data. Any other dataset is the user's own files,
    checked when they are read."""
    if dataset in DEMO_DATASETS:
        demo.ensure(config.DEMO_DIR)


def uses_demo(dataset: str) -> bool:
    """Whether the localization data paths come from the demo world (``demo``), else from the configured COCO /
    Visual Genome paths (``coco``); any other name is a one-line error. Nothing is read or written here:
    :func:`prepare_dataset` writes the demo world."""
    if dataset not in ("coco", "demo"):
        raise UserError(f"dataset {dataset!r}: localization runs on COCO images ('coco'), the demo world ('demo') "
                        f"or a JSON-lines file (data/README.md){did_you_mean(dataset, ('coco', 'demo'))}; pass "
                        f"--dataset")
    return dataset == "demo"


def train_transform(cfg: TrainConfig) -> Callable:
    """Random resized crop (+ flip) as in §4.1; with ``resize_only`` the whole image resized to crop_size x
    crop_size whatever its aspect ratio, as Das et al.'s code trains."""
    if cfg.resize_only:
        steps: list[Callable] = [transforms.Resize((cfg.crop_size, cfg.crop_size))]
    else:
        steps = [transforms.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.crop_scale))]
    if cfg.flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size: int, protocol: str = "resize") -> Callable:
    """Evaluation preprocessing with ImageNet mean and std.

    ``resize``: size x size regardless of aspect ratio (the original release's protocol: 400, and 416 for the
    pointing game). ``crop``: the smaller side to ``size``, then the centre square of 224/256 of it (the paper's
    alternative protocol with size 256: a 224 x 224 crop).
    """
    if protocol == "resize":
        geometry = [transforms.Resize((size, size))]
    elif protocol == "crop":
        geometry = [transforms.Resize(size), transforms.CenterCrop(round(size * 224 / 256))]
    else:
        raise UserError(f"unknown evaluation protocol {protocol!r}: choose one of {', '.join(EVAL_PROTOCOLS)}")
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class PairDataset(Dataset):
    """Training pairs: ``captions_per_image`` captions per image and epoch, each a positive of the image.

    Each image's captions are visited in an order drawn anew for every (seed, epoch, image), so that with fewer
    pairs than captions an epoch still mixes every caption position (datasets may order captions by style), and
    with ``captions_per_image`` >= the caption count every caption is used. An item is (image, captions, image
    index): with ``group`` all the image's captions of the epoch come in one item (one crop, encoded once),
    otherwise each caption is an item of its own with its own crop (the original release's pairs).

    An item's random augmentation is drawn from (seed, epoch, item) alone, whatever process, worker or position
    in the epoch draws it, so a run resumed mid-epoch sees the same crops. An image that fails to decode is
    replaced by the next one that decodes, with that image's captions and index (batches keep their size and
    their pairs stay true); each item lists the files it met that fail (path, reason), for the main process to
    count (:class:`misc.data.decoded.Undecodable`: a worker's own count would be lost with it).
    """

    def __init__(self, records: list[Record], transform: Callable, captions_per_image: int = 5,
                 seed: int = 0, group: bool = False) -> None:
        self.records, self.transform, self.per_image, self.seed = records, transform, captions_per_image, seed
        self.per_item = captions_per_image if group else 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) * (self.per_image // self.per_item)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str], int, Unreadable]:
        image_index, item = divmod(index, self.per_image // self.per_item)
        image_index, image, failed = self.decoded(image_index)
        record = self.records[image_index]
        order = np.random.default_rng([self.seed, self.epoch, image_index]).permutation(len(record.captions))
        slots = range(item * self.per_item, (item + 1) * self.per_item)
        captions = [record.captions[order[slot % len(order)]] for slot in slots]
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's global generator
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]))
            return self.transform(image), captions, image_index, failed

    def decoded(self, image_index: int) -> tuple[int, Image.Image, Unreadable]:
        """The first image from ``image_index`` on (cyclically) that decodes, its index, and the files before it
        that do not."""
        failed = []
        for offset in range(len(self.records)):
            candidate = (image_index + offset) % len(self.records)
            image, reason = try_decode(self.records[candidate].image)
            if image is not None:
                return candidate, image, failed
            failed.append((str(self.records[candidate].image), reason))
        raise UserError(f"none of the {len(self.records)} training images can be decoded")


class PairCollate:
    """Stack images and embed captions with the frozen word vectors: -> (images (B, ...), Encoded (B * n),
    image ids (B * n,), the undecodable files the batch's items replaced), n the captions per item; the captions of
    an item are consecutive."""

    def __init__(self, words: WordVectors) -> None:
        self.words = words

    def __call__(self, batch: list[tuple[torch.Tensor, list[str], int, Unreadable]]
                 ) -> tuple[torch.Tensor, Encoded, torch.Tensor, Unreadable]:
        images, captions, ids, failed = zip(*batch)
        flat = [caption for group in captions for caption in group]
        owners = [index for group, index in zip(captions, ids) for _ in group]
        return torch.stack(images), self.words.encode(flat), torch.tensor(owners), [f for item in failed for f in item]


def eval_captions(records: list[Record], per_image: int = 5) -> tuple[list[str], torch.Tensor]:
    """The first ``per_image`` captions of every image (the COCO protocol) and the image index of each."""
    captions, owner = [], []
    for index, record in enumerate(records):
        kept = record.captions[:per_image]
        captions += kept
        owner += [index] * len(kept)
    return captions, torch.tensor(owner, dtype=torch.long)


# --------------------------------------------------------------------------- localization data

def coco_files(karpathy_json: Path, images_root: Path, split: str | None) -> dict[int, Path]:
    """cocoid -> image file for the val2014 images of Karpathy's split file, or for the images of ``split``."""
    try:
        entries = json.loads(karpathy_json.read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{karpathy_json}: not a Karpathy split file ({error}) (config key 'coco_karpathy')") \
            from error
    files = {}
    for entry in entries:
        if "cocoid" not in entry:
            raise UserError(f"{karpathy_json}: entries have no 'cocoid'; the pointing game needs COCO's split file")
        folder = entry.get("filepath", "")
        if (entry.get("split") in SPLITS[split]) if split else folder == "val2014":
            files[int(entry["cocoid"])] = images_root / folder / entry["filename"]
    return files


def read_regions(vg_dir: Path, files: dict[int, Path], limit: int | None) -> list[tuple[object, list]]:
    """(VG image, its regions) for the VG images whose coco_id is in ``files``, read with visual_genome.local.

    Region lists are parsed only for those images: ``local.get_all_region_descriptions`` would build objects for
    all 108k VG images (and fails on an image without regions).
    """
    config.required_file("vg_dir", vg_dir, "image_data.json")
    regions_file = config.required_file("vg_dir", vg_dir, "region_descriptions.json")
    try:
        images = [image for image in vg_local.get_all_image_data(data_dir=str(vg_dir))
                  if image.coco_id is not None and int(image.coco_id) in files]
        images = images[:limit] if limit is not None else images
        wanted = {image.id: image for image in images}
        regions = {}
        for entry in json.loads(regions_file.read_text(encoding="utf-8")):
            image = wanted.get(entry.get("id", entry.get("image_id")))
            if image is not None and entry["regions"]:
                regions[image.id] = vg_utils.parse_region_descriptions(entry["regions"], image)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{vg_dir}: not Visual Genome image_data.json / region_descriptions.json ({error!r}) "
                          f"(config key 'vg_dir')") from error
    return [(image, regions.get(image.id, [])) for image in images]


def load_coco(annotations: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        try:
            return COCO(str(annotations))
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{annotations}: not a COCO instances file ({error!r}) (config key "
                              f"'coco_annotations')") from error


def truth_masks(coco: COCO, image_id: int) -> dict[int, torch.Tensor]:
    """Category id -> union (H, W) bool mask of its instances in the image, crowd regions included."""
    masks: dict[int, torch.Tensor] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        mask = torch.from_numpy(coco.annToMask(ann)).bool()
        category = ann["category_id"]
        masks[category] = masks[category] | mask if category in masks else mask
    return masks
