"""Image-caption data: Karpathy splits (COCO, Flickr30k, the demo world), plain caption files, and the
torch datasets, transforms and collation shared by training and evaluation."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from misc import config
from misc.config import ConfigError, TrainConfig
from misc.words import Encoded, WordVectors, tokenize

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = {"train": ("train",), "restval": ("restval",), "trainrv": ("train", "restval"), "val": ("val",),
          "test": ("test",)}
DATASET_KEYS = {"coco": ("coco_images", "coco_karpathy"), "demo": ("coco_images", "coco_karpathy"),
                "flickr30k": ("flickr_images", "flickr_karpathy")}


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
        raise ConfigError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    try:
        entries = json.loads(Path(json_path).read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"{json_path}: not a Karpathy split file ({error})") from error
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
        raise ConfigError(f"{json_path}: no image with captions in split {split!r}")
    return records


def caption_file_records(path: Path) -> list[Record]:
    """A user's own data: JSON lines ``{"image": path, "captions": [...]}``, image paths relative to the file."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image, captions = Path(item["image"]), [str(c) for c in item["captions"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path}:{number}: expected {{\"image\": ..., \"captions\": [...]}} ({error})") from error
        kept = [c for c in captions if tokenize(c)]
        if len(kept) < len(captions):
            log.warning("%s:%d: skipped %d captions with no words", path, number, len(captions) - len(kept))
        if kept:
            records.append(Record(image if image.is_absolute() else path.parent / image, kept, number))
    if not records:
        raise ConfigError(f"{path}: no image with captions")
    return records


def load_records(dataset: str, split: str) -> list[Record]:
    """Records of a named dataset (coco, flickr30k, demo) or of a JSON-lines caption file, paths from config."""
    if dataset not in DATASET_KEYS:
        candidate = Path(dataset)
        if candidate.is_file():
            return caption_file_records(candidate)
        raise ConfigError(f"unknown dataset {dataset!r}: use coco, flickr30k, demo or a JSON-lines caption file")
    images_key, split_key = DATASET_KEYS[dataset]
    demo = dataset == "demo"
    records = karpathy_records(config.path(split_key, demo=demo), config.path(images_key, demo=demo), split)
    check_images(records, images_key)
    return records


def check_images(records: list[Record], key: str = "") -> None:
    missing = [r.image for r in records if not r.image.exists()]
    if missing:
        where = f" (config key '{key}')" if key else ""
        raise ConfigError(f"{len(missing)} of {len(records)} images are missing, e.g. {missing[0]}{where}")


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def train_transform(cfg: TrainConfig) -> Callable:
    """Random resized crop (+ flip) as in §4.1."""
    steps = [transforms.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.crop_scale))]
    if cfg.flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


EVAL_PROTOCOLS = ("resize", "crop")


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
        raise ConfigError(f"unknown evaluation protocol {protocol!r}: choose one of {', '.join(EVAL_PROTOCOLS)}")
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class PairDataset(Dataset):
    """Training pairs: ``captions_per_image`` (image, caption) pairs per image and epoch, rotating through
    each image's captions across epochs so every caption is used."""

    def __init__(self, records: list[Record], transform: Callable, captions_per_image: int = 5) -> None:
        self.records, self.transform, self.per_image = records, transform, captions_per_image
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) * self.per_image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        image_index, slot = divmod(index, self.per_image)
        record = self.records[image_index]
        caption = record.captions[(self.epoch * self.per_image + slot) % len(record.captions)]
        return self.transform(load_image(record.image)), caption, image_index


class ImageDataset(Dataset):
    """Images only, for encoding."""

    def __init__(self, paths: list[Path], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index]))


class PairCollate:
    """Stack images and embed captions with the frozen word vectors: -> (images, Encoded, image ids)."""

    def __init__(self, words: WordVectors) -> None:
        self.words = words

    def __call__(self, batch: list[tuple[torch.Tensor, str, int]]) -> tuple[torch.Tensor, Encoded, torch.Tensor]:
        images, captions, ids = zip(*batch)
        return torch.stack(images), self.words.encode(list(captions)), torch.tensor(ids)


def eval_captions(records: list[Record], per_image: int = 5) -> tuple[list[str], torch.Tensor]:
    """The first ``per_image`` captions of every image (the COCO protocol) and the image index of each."""
    captions, owner = [], []
    for index, record in enumerate(records):
        kept = record.captions[:per_image]
        captions += kept
        owner += [index] * len(kept)
    return captions, torch.tensor(owner, dtype=torch.long)
