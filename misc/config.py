"""Every dataset and weight path, and every hyper-parameter default.

Paths: each key has a default under ``data/`` and an environment variable that overrides it
(``DSVE_<KEY>``). :func:`path` resolves a key and fails with one line naming the key, the expected
file and where it comes from. Hyper-parameters are plain dataclasses; :data:`PRESETS` holds the
paper's settings and the small ``demo`` settings that train on two CPU cores.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
DEMO_DIR = Path(os.environ.get("DSVE_DEMO_DIR", DATA / "demo"))  # movable, e.g. for tests
RUNS = ROOT / "runs"


class ConfigError(Exception):
    """A user-facing configuration problem; CLIs print its message as one line and exit."""


@dataclass(frozen=True)
class PathKey:
    default: Path
    what: str
    source: str


PATHS: dict[str, PathKey] = {
    "coco_images": PathKey(DATA / "coco" / "images", "a folder holding train2014/ and val2014/",
                           "https://cocodataset.org/#download (2014 train and val images)"),
    "coco_karpathy": PathKey(DATA / "coco" / "dataset_coco.json", "Karpathy's COCO splits dataset_coco.json",
                             "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"),
    "coco_annotations": PathKey(DATA / "coco" / "annotations", "a folder holding instances_val2014.json",
                                "https://cocodataset.org/#download (2014 train/val annotations)"),
    "flickr_images": PathKey(DATA / "flickr30k" / "images", "the Flickr30k image folder",
                             "https://shannon.cs.illinois.edu/DenotationGraph/"),
    "flickr_karpathy": PathKey(DATA / "flickr30k" / "dataset_flickr30k.json",
                               "Karpathy's Flickr30k splits dataset_flickr30k.json",
                               "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"),
    "vg_dir": PathKey(DATA / "vg", "a folder holding image_data.json and region_descriptions.json",
                      "https://visualgenome.org/api/v0/api_home.html (version 1.2)"),
    "word_vectors": PathKey(DATA / "words" / "utable.npy",
                            "word vectors: utable.npy + dictionary.txt, a word2vec .bin/.txt or a GloVe .txt",
                            "the original release's skip-thought files (see data/README.md)"),
    "resnet_weights": PathKey(DATA / "weights" / "resnet152.pth", "an ImageNet state dict of the trunk",
                              "torchvision's ResNet weights, downloaded once by hand (see data/README.md)"),
}

DEMO_PATHS: dict[str, Path] = {
    "coco_images": DEMO_DIR / "images",
    "coco_karpathy": DEMO_DIR / "dataset_coco.json",
    "coco_annotations": DEMO_DIR / "annotations",
    "vg_dir": DEMO_DIR / "vg",
    "word_vectors": DEMO_DIR / "words" / "demo_word2vec.bin",
}


def env_name(key: str) -> str:
    return f"DSVE_{key.upper()}"


def path(key: str, *, demo: bool = False, must_exist: bool = True) -> Path:
    """Resolve a path key: the demo world's file when ``demo``, else the environment override, else the default."""
    if key not in PATHS:
        raise KeyError(f"unknown path key {key!r}")
    override = os.environ.get(env_name(key))
    if demo and key in DEMO_PATHS:
        resolved = DEMO_PATHS[key]
    elif override:
        resolved = Path(override).expanduser()
    else:
        resolved = PATHS[key].default
    if must_exist and not resolved.exists():
        raise ConfigError(missing_message(key, resolved))
    return resolved


def missing_message(key: str, resolved: Path) -> str:
    spec = PATHS[key]
    return (f"config key '{key}': {resolved} not found; expected {spec.what}. Get it from {spec.source} "
            f"and put it there or set {env_name(key)}")


def required_file(key: str, folder: Path, name: str) -> Path:
    """A file inside the folder of a config key, with the key's one-line error when it is missing."""
    path = folder / name
    if not path.is_file():
        raise ConfigError(missing_message(key, path))
    return path


def configured(key: str) -> bool:
    """True when the key points at an existing file (used to fall back to the demo world)."""
    return path(key, must_exist=False).exists()


# --------------------------------------------------------------------------- hyper-parameters

@dataclass
class ModelConfig:
    """Network dimensions; defaults are the paper's (§3, §4.1)."""

    trunk: str = "resnet152"  # any torchvision ResNet
    maps_dim: int = 2400  # D', channels of the maps G
    embed_dim: int = 2400  # d, joint space (also the SRU hidden size)
    pooling: str = "weldon"  # or "gap"
    weldon_k: float = 15  # a count, or a fraction of positions when < 1
    image_dropout: float = 0.5
    word_dim: int = 620
    sru_layers: int = 4
    text_dropout: float = 0.25  # sru's dropout: on the outputs of every SRU layer but the last
    rnn_dropout: float = 0.25  # sru's rnn_dropout: on every SRU layer's input, one mask per caption (the original's)
    forget_bias: float = 0.0  # initial SRU forget-gate bias; > 0 keeps early words in memory longer (paper: 0)
    # What a new model's trunk starts from (models.visual.init_trunk): "scratch", "IMAGENET1K_V1" | "IMAGENET1K_V2"
    # (torchvision's, from torch hub's cache), "file:PATH" (a torchvision state dict of the trunk) or
    # "checkpoint:PATH" (train.py --init); "" = not chosen yet. A checkpoint's weights supersede it.
    trunk_init: str = ""


@dataclass
class TrainConfig:
    """Optimisation and data settings (§4.1). Epoch numbers count from 0; the defaults are the schedule the original
    release's train.py ran (see misc/schedule.py), one epoch later than the paper's text (preset ``paper-text``)."""

    dataset: str = "coco"  # coco | flickr30k | demo
    split: str = "trainrv"  # train+restval
    val_split: str = "val"
    epochs: int = 20
    batch_size: int = 160  # items per step: pairs, or images with all their captions when group_captions
    lr: float = 1e-3
    lr_halve_epochs: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])  # the first epochs at each half
    text_from_epoch: int = 2  # before: only the projection A, b trains
    trunk_from_epoch: int = 9  # from here the trunk and the 1x1 conv are fine-tuned too
    frozen_trunk: list[str] = field(default_factory=lambda: ["conv1", "bn1", "layer1", "layer2"])
    frozen_mode: str = "train"  # frozen parts in train mode (batch statistics, dropout) as the original ran, or eval
    margin: float = 0.2
    loss: str = "hard"  # hard (eq. 7) | sum (eq. 5)
    sum_loss_epochs: int = 0  # warm-up epochs with the sum loss (eq. 5) before `loss`
    grad_clip: float | None = None  # cap on the gradient norm of a step (the paper has none)
    crop_size: int = 256
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    eval_size: int = 350  # validation during training
    test_size: int = 400  # evaluation and extraction: resize to test_size x test_size (original protocol)
    captions_per_image: int = 5  # pairs drawn per image and epoch (5 = every caption)
    group_captions: bool = False  # an image's pairs of the epoch share one crop and one forward pass
    workers: int = 4
    seed: int = 0


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The original release's train.py as it ran (the defaults above); the trunk source is chosen per run.
    "paper": {"model": {}, "train": {}},
    # The schedule as §4.1 states it: lr halved from epoch 2 to 6, the trunk fine-tuned from epoch 8.
    "paper-text": {"model": {}, "train": {"lr_halve_epochs": [2, 3, 4, 5, 6], "trunk_from_epoch": 8}},
    # Small enough to train on 2 CPU cores in about ten minutes from no pretrained weights at all: a random ResNet-18
    # whose conv1 and layer1 stay frozen (random low-level filters, no backward through the largest maps), 96x96
    # crops of the 128x128 images, no flip (the demo captions say left and right), a mild crop (they also say top
    # and corners), every caption of an image against one crop of it (a batch of 32 images is 160 pairs), an SRU
    # forget bias of 2 so that the caption's first words (colours, shapes) reach its last state, and two epochs of
    # the sum-over-negatives loss, which gets a randomly initialised model off the ground where hardest negatives
    # stall, before the paper's hardest negatives. Frozen layers keep fixed batch-norm statistics (eval mode) and
    # the SRU has no input dropout.
    "demo": {
        "model": {"trunk": "resnet18", "maps_dim": 256, "embed_dim": 256, "weldon_k": 0.2, "word_dim": 64,
                  "sru_layers": 2, "text_dropout": 0.1, "rnn_dropout": 0.0, "image_dropout": 0.2, "forget_bias": 2.0,
                  "trunk_init": "scratch"},
        "train": {"dataset": "demo", "split": "train", "epochs": 4, "batch_size": 32, "lr": 1e-3,
                  "lr_halve_epochs": [3], "text_from_epoch": 0, "trunk_from_epoch": 0,
                  "frozen_trunk": ["conv1", "bn1", "layer1"], "frozen_mode": "eval", "loss": "hard",
                  "sum_loss_epochs": 2,
                  "crop_size": 96, "crop_scale": [0.85, 1.0], "flip": False, "eval_size": 96, "test_size": 96,
                  "captions_per_image": 5, "group_captions": True, "workers": 1},
    },
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = PRESETS[name]
    return ModelConfig(**values["model"]), TrainConfig(**values["train"])


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from plain data, rejecting unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return cls(**values)


def apply_settings(model: ModelConfig, train: TrainConfig, settings: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply ``model.KEY=VALUE`` / ``train.KEY=VALUE`` settings (VALUE parsed as JSON, else kept as text)."""
    configs = {"model": model, "train": train}
    for setting in settings:
        name, _, text = setting.partition("=")
        section, _, key = name.partition(".")
        if not _ or section not in configs or key not in {f.name for f in fields(configs[section])}:
            raise ConfigError(f"--set {setting!r}: expected model.KEY=VALUE or train.KEY=VALUE with KEY one of "
                              f"the fields of ModelConfig / TrainConfig in misc/config.py")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        configs[section] = replace(configs[section], **{key: value})
    return configs["model"], configs["train"]
