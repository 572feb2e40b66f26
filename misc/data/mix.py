"""The training data of a run over one dataset or several (Das et al. 2019's "mix" checkpoints, e.g. COCO +
Flickr30K): each dataset read by its own loader (:func:`misc.data.datasets.load_records`) from the run's split,
checked against the evaluation images it must not hold, counted, and the records concatenated in order. One
:class:`misc.data.datasets.PairDataset` over the concatenation keeps every image's index, which the losses use to
tell a caption's own image from the others, distinct across datasets."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from misc.config import TrainConfig
from misc.data import flickr_entities
from misc.data.datasets import DATASET_KEYS, Record, Unreadable, is_custom, load_split
from misc.errors import UserError, did_you_mean

log = logging.getLogger("train")
KNOWN = (*DATASET_KEYS, flickr_entities.DATASET)


@dataclass(frozen=True)
class Count:
    """What one dataset brings to a run: its training images and the image-caption pairs a full pass draws."""

    dataset: str
    split: str
    images: int
    pairs: int

    def __str__(self) -> str:
        return f"{self.dataset} {self.split}: {self.images} images, {self.pairs} pairs"


def check_names(datasets: list[str]) -> None:
    """Every dataset of a run names a built-in one or an existing JSON-lines file, checked before any is read."""
    for name in datasets:
        if name not in KNOWN and not is_custom(name):
            raise UserError(f"train.dataset {', '.join(datasets)}: unknown dataset {name!r}"
                            f"{did_you_mean(name, KNOWN)}: use coco, flickr30k, flickr30k_entities, demo or a "
                            f"JSON-lines file (data/README.md)")


def training_records(cfg: TrainConfig, limit: int | None = None) -> tuple[list[Record], list[Count], Unreadable]:
    """The training records of every dataset of ``cfg`` in order (with ``limit``, the first ``limit`` images of
    each), each one's :class:`Count`, and the images left out as undecodable. A flickr30k dataset holding images of the Flickr30K Entities test split is
    refused unless ``train.allow_test_overlap``; an image found in two datasets is said (it counts as two images).
    :func:`check_names` first fails sooner on an unknown name."""
    records: list[Record] = []
    counts, unreadable = [], []
    for name in cfg.datasets:
        own, broken = load_split(name, cfg.split)
        unreadable += broken
        if limit and limit > len(own):
            log.warning("--limit %d: %s %s has only %d images; training on all of them", limit, name, cfg.split,
                        len(own))
        own = own[:limit]
        if name == "flickr30k" and not cfg.allow_test_overlap:
            flickr_entities.check_test_overlap([record.image.stem for record in own], name)
        shared = {record.image for record in records}.intersection(record.image for record in own)
        if shared:
            log.warning("%s %s: %d of its images are also in an earlier dataset of the run, e.g. %s; each copy is "
                        "a separate image to the loss", name, cfg.split, len(shared), min(shared))
        counts.append(Count(name, cfg.split, len(own), len(own) * cfg.captions_per_image))
        records += own
    return records, counts, unreadable
