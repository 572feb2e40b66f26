"""Every dataset and weight path, and every hyper-parameter default.

Paths: each key has a default under the data root :data:`DATA` and an environment variable that overrides it
(``DSVE_<KEY>``). :func:`path` resolves a key and fails with one line naming the key, the expected file and where it
comes from. The data root is ``DSVE_DATA`` when set; else, in a clone, the clone's ``data/``; else (the installed
package) the working directory's ``data/``, never the installed package's folder. Training runs go to ``runs/``
beside it in the same way. Hyper-parameters are plain dataclasses; :data:`PRESETS` holds the named settings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from misc.errors import UserError, check_choice, check_number, did_you_mean
from models.checks import from_dict  # noqa: F401  (config.from_dict rebuilds a checkpoint's sections)
from models.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
# A clone holds its pyproject.toml beside misc/; an installed package (site-packages) does not, and nothing is
# written there: data and runs belong to the working directory, as they would in a clone.
CLONE = (ROOT / "pyproject.toml").is_file()
HOME = ROOT if CLONE else Path.cwd()
DATA = Path(os.environ["DSVE_DATA"]).expanduser().resolve() if os.environ.get("DSVE_DATA") else HOME / "data"
DEMO_DIR = Path(os.environ.get("DSVE_DEMO_DIR", DATA / "demo"))  # movable, e.g. for tests
RUNS = HOME / "runs"


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
    "flickr_entities": PathKey(DATA / "flickr30k_entities",
                               "a folder holding Annotations/, Sentences/, train.txt, val.txt and test.txt",
                               "https://github.com/BryanPlummer/flickr30k_entities (annotations.zip, split files)"),
    "glove_vectors": PathKey(DATA / "words" / "glove.6B.300d.txt", "GloVe 6B 300-d word vectors (text, uncased)",
                             "https://nlp.stanford.edu/projects/glove/ (glove.6B.zip), as Das et al. used"),
    "resnet_weights": PathKey(DATA / "weights" / "resnet152.pth", "an ImageNet state dict of the trunk",
                              "torchvision's ResNet weights, downloaded once by hand (see data/README.md)"),
}

DEMO_PATHS: dict[str, Path] = {
    "coco_images": DEMO_DIR / "images",
    "coco_karpathy": DEMO_DIR / "dataset_coco.json",
    "coco_annotations": DEMO_DIR / "annotations",
    "vg_dir": DEMO_DIR / "vg",
    "word_vectors": DEMO_DIR / "words" / "demo_word2vec.bin",
    "flickr_images": DEMO_DIR / "flickr30k_entities" / "images",
    "flickr_entities": DEMO_DIR / "flickr30k_entities",
}


def default_words_key(arch: str, demo: bool) -> str:
    """The path key of a new run's default word vectors: the demo world's on it, else GloVe for the matchmap
    (Das et al. 2019) and the skip-thought table for DSVE."""
    return "glove_vectors" if arch == "matchmap" and not demo else "word_vectors"


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
        raise UserError(missing_message(key, resolved))
    return resolved


def missing_message(key: str, resolved: Path) -> str:
    spec = PATHS[key]
    return (f"config key '{key}': {resolved} not found; expected {spec.what}. Get it from {spec.source} "
            f"and put it there or set {env_name(key)}")


def required_file(key: str, folder: Path, name: str) -> Path:
    """A file inside the folder of a config key, with the key's one-line error when it is missing."""
    path = folder / name
    if not path.is_file():
        raise UserError(missing_message(key, path))
    return path


def configured(key: str) -> bool:
    """True when the key points at an existing file (used to fall back to the demo world)."""
    return path(key, must_exist=False).exists()


# --------------------------------------------------------------------------- hyper-parameters

EVAL_PROTOCOLS = ("resize", "crop")  # evaluation preprocessing (misc.data.datasets.eval_transform)
# misc.train.losses.LOSSES's names (tests/test_loss.py checks), here without torch: --help loads no torch.
LOSSES = ("hard", "sum", "npair", "triplet")
OPTIMIZERS = ("adam", "sgd")
FROZEN_MODES = ("train", "eval")
LOSS_REDUCTIONS = ("sum", "mean")

@dataclass
class TrainConfig:
    """Optimisation and data settings (§4.1). Epoch numbers count from 0; the defaults are the schedule the original
    release's train.py ran (see misc/train/schedule.py), one epoch later than the paper's text (preset
    ``paper-text``)."""

    dataset: str = "coco"  # coco | flickr30k | demo
    split: str = "trainrv"  # train+restval
    val_split: str = "val"
    words: str = ""  # a new run's word vectors: a file, "glove-6b-50d", or "" for the configured key's (--words wins)
    epochs: int = 20
    batch_size: int = 160  # items per step: pairs, or images with all their captions when group_captions
    lr: float = 1e-3
    lr_halve_epochs: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])  # the first epochs at each half
    text_from_epoch: int = 2  # before: only the projection A, b trains
    trunk_from_epoch: int = 9  # from here the trunk and the 1x1 conv are fine-tuned too
    frozen_trunk: list[str] = field(default_factory=lambda: ["conv1", "bn1", "layer1", "layer2"])
    frozen_mode: str = "train"  # frozen parts in train mode (batch statistics, dropout) as the original ran, or eval
    margin: float = 0.2
    loss: str = "hard"  # hard (eq. 7) | sum (eq. 5) | npair | triplet (sampled impostors; misc/train/losses.py)
    sum_loss_epochs: int = 0  # warm-up epochs with the sum loss (eq. 5) before `loss`
    grad_clip: float | None = None  # cap on the gradient norm of a step (the paper has none)
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient norm skipped before the run stops
    optimizer: str = "adam"  # adam | sgd (with momentum)
    momentum: float = 0.9  # sgd only
    lr_decay_every: int = 0  # > 0: lr x lr_decay every that many epochs, instead of lr_halve_epochs
    lr_decay: float = 0.1
    lr_decay_first: int = 0  # the first epoch at lr x lr_decay (0: lr_decay_every; Das et al.'s code: 9, see preset)
    crop_size: int = 256
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    resize_only: bool = False  # a plain crop_size x crop_size resize, no crop (Das et al.'s code), instead of the crop
    eval_size: int = 350  # validation during training
    test_size: int = 400  # evaluation and extraction: resize to test_size x test_size (original protocol)
    captions_per_image: int = 5  # pairs drawn per image and epoch (5 = every caption)
    group_captions: bool = False  # an image's pairs of the epoch share one crop and one forward pass
    workers: int = 4
    seed: int = 0
    steps_per_epoch: int = 0  # 0: an epoch is a full pass; N > 0: N batches drawn with replacement (Das et al.'s code)
    loss_reduction: str = "sum"  # mean: the batch loss divided by the batch size (Das et al.'s code)
    allow_test_overlap: bool = False  # train on images of the validation split or of the Entities test split anyway

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "captions_per_image"):
            check_number(f"train.{key}", getattr(self, key), low=1, whole=True)
        for key in ("text_from_epoch", "trunk_from_epoch", "sum_loss_epochs", "workers", "skip_nonfinite",
                    "steps_per_epoch", "lr_decay_every", "lr_decay_first"):
            check_number(f"train.{key}", getattr(self, key), low=0, whole=True)
        for key in ("crop_size", "eval_size", "test_size"):
            check_number(f"train.{key}", getattr(self, key), low=32, whole=True)
        check_number("train.lr", self.lr, low=0, low_open=True)
        check_number("train.margin", self.margin, low=0)
        check_number("train.momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("train.lr_decay", self.lr_decay, low=0, high=1, low_open=True)
        if self.lr_decay_every and self.lr_halve_epochs:
            raise UserError(f"train.lr_decay_every = {self.lr_decay_every} and train.lr_halve_epochs = "
                            f"{self.lr_halve_epochs}: choose one schedule, set the other to 0 or []")
        if self.lr_decay_first and not self.lr_decay_every:
            raise UserError(f"train.lr_decay_first = {self.lr_decay_first} needs train.lr_decay_every > 0")
        if self.grad_clip is not None:
            check_number("train.grad_clip", self.grad_clip, low=0, low_open=True)
        for epoch in self.lr_halve_epochs:
            check_number("train.lr_halve_epochs", epoch, low=0, whole=True)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(f"train.crop_scale = {self.crop_scale}: expected [low, high] with 0 < low <= high <= 1")
        check_choice("train.loss", self.loss, LOSSES)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.frozen_mode", self.frozen_mode, FROZEN_MODES)
        check_choice("train.loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)


DAS2019_MODEL = {"arch": "matchmap", "trunk": "vgg19", "trunk_cut": "conv5", "region_dim": 1024, "lstm_hidden": 1024,
                 "word_dim": 300, "score": "avg_both"}

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
    # The matchmap system on the demo world, in about three minutes on 2 CPU cores: a random ResNet-18 cut after
    # layer3 (a 6 x 6 grid of region vectors at 96 x 96, for pointing), 256-d regions and LSTM, the demo's 64-d
    # word vectors, the N-pair loss with Adam; data, crops and frozen layers as the demo preset.
    "demo-matchmap": {
        "model": {"arch": "matchmap", "trunk": "resnet18", "trunk_cut": "layer3", "region_dim": 256,
                  "lstm_hidden": 256, "word_dim": 64, "score": "avg_both", "trunk_init": "scratch"},
        "train": {"dataset": "demo", "split": "train", "epochs": 1, "batch_size": 32, "lr": 1e-3,
                  "lr_halve_epochs": [], "text_from_epoch": 0, "trunk_from_epoch": 0,
                  "frozen_trunk": ["conv1", "bn1", "layer1"], "frozen_mode": "eval", "loss": "npair",
                  "crop_size": 96, "crop_scale": [0.85, 1.0], "flip": False, "eval_size": 96, "test_size": 96,
                  "captions_per_image": 5, "group_captions": True, "workers": 1},
    },
    # The real-photo world of misc/data/photos.py (written to data/photos by `python photo_world.py data/photos`)
    # in a few minutes on 2 CPU cores, from the ImageNet EfficientNet-Lite0 package and GloVe 6B 50-d, both
    # offline: stem to stage4 stay frozen in eval mode (fixed batch statistics, no backward through the large
    # maps), the rest trains from the start at 128 x 128 (a 4 x 4 grid; localize at 256 or more), no flip
    # (captions say left and right), a mild crop, every caption of an image against one crop of it.
    "photos": {
        "model": {"trunk": "timm:efficientnet_lite0", "trunk_init": "package:efficientnet-lite0", "maps_dim": 512,
                  "embed_dim": 512, "weldon_k": 0.2, "word_dim": 50, "sru_layers": 1, "text_dropout": 0.1,
                  "rnn_dropout": 0.0, "image_dropout": 0.2, "forget_bias": 2.0},
        "train": {"dataset": str(DATA / "photos" / "photos.jsonl"), "words": "glove-6b-50d", "split": "train",
                  "epochs": 4, "batch_size": 32, "lr": 1e-3, "lr_halve_epochs": [2, 3], "text_from_epoch": 0,
                  "trunk_from_epoch": 0,
                  "frozen_trunk": ["stem", "stage1", "stage2", "stage3", "stage4"], "frozen_mode": "eval",
                  "loss": "hard", "sum_loss_epochs": 1, "crop_size": 128, "crop_scale": [0.85, 1.0], "flip": False,
                  "eval_size": 128, "test_size": 128, "captions_per_image": 5, "group_captions": True,
                  "workers": 1},
    },
    # Das, Ghouse, Verma, Li 2019 as the paper states it: VGG-19 conv5_4 regions (3x3 conv to 1024, BN, ReLU), an
    # LSTM (1024) over frozen GloVe-300 words (config key glove_vectors), N-pair loss, SGD (momentum 0.9), lr 1e-3 / 10
    # every 10 epochs, 64 pairs of whole images resized to 224 x 224 (no crop or flip, as their code); all parts train
    # from the start; trunk source per run. ResNet variant: model.trunk=resnet50, model.trunk_cut=layer3.
    "das2019": {"model": dict(DAS2019_MODEL), "train": {
        "epochs": 30, "batch_size": 64, "lr": 1e-3, "optimizer": "sgd", "momentum": 0.9, "lr_halve_epochs": [],
        "lr_decay_every": 10, "lr_decay": 0.1, "text_from_epoch": 0, "trunk_from_epoch": 0, "frozen_trunk": [],
        "loss": "npair", "margin": 0.1, "crop_size": 224, "resize_only": True, "flip": False, "eval_size": 224,
        "test_size": 224}},
    # Das et al.'s code (github deepandas11/LocNet) by default: main.py's flags (triplet, hard, margin 0.1, SGD lr 1e-3
    # momentum 0.9, 10 epochs, batch 64, flickr, parse_mode phrase, 224 resize), steps/utils.py (loss / batch; lr / 10
    # at their epoch 10 from 1: our 9), 100 batches drawn with replacement, random unknown words (flickr_vocab_gen.py).
    "das2019-code": {"model": {**DAS2019_MODEL, "text_units": "phrases", "unknown_words": "random"}, "train": {
        "dataset": "flickr30k_entities", "split": "train", "val_split": "val", "epochs": 10, "batch_size": 64,
        "lr": 1e-3, "optimizer": "sgd", "momentum": 0.9, "lr_halve_epochs": [], "lr_decay_every": 10, "lr_decay": 0.1,
        "lr_decay_first": 9, "text_from_epoch": 0, "trunk_from_epoch": 0, "frozen_trunk": [], "loss": "hard",
        "margin": 0.1, "loss_reduction": "mean", "steps_per_epoch": 100, "crop_size": 224, "resize_only": True,
        "flip": False, "eval_size": 224, "test_size": 224}},
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = PRESETS[name]
    return ModelConfig(**values["model"]), TrainConfig(**values["train"])


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}


def parse_value(section: str, key: str, text: str) -> Any:
    """``text`` as a value of the field ``section.key``, typed from the field's own annotation (int, float, bool,
    str, a list of them, or any of these or None); a value of another type is a one-line error."""
    kind = get_type_hints(SECTIONS[section])[key]
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if fits(value, kind):
        return typed(value, kind)
    if fits(text, kind):  # a string field given something JSON reads as a number, e.g. a file name "2400"
        return text
    raise UserError(f"--set {section}.{key}={text}: expected {type_name(kind)}")


def fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` (parsed JSON) is of the annotated type ``kind``."""
    if get_origin(kind) in (Union, UnionType):
        return any(fits(value, option) for option in get_args(kind))
    if get_origin(kind) is list:
        return isinstance(value, list) and all(fits(item, get_args(kind)[0]) for item in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def typed(value: Any, kind: Any) -> Any:
    """``value`` (which :func:`fits` ``kind``) with its whole numbers made floats where ``kind`` wants a float."""
    if get_origin(kind) in (Union, UnionType):
        return typed(value, next(option for option in get_args(kind) if fits(value, option)))
    if get_origin(kind) is list:
        return [typed(item, get_args(kind)[0]) for item in value]
    return float(value) if kind is float else value


def type_name(kind: Any) -> str:
    if get_origin(kind) in (Union, UnionType):
        return " or ".join(type_name(option) for option in get_args(kind))
    if get_origin(kind) is list:
        return f"a JSON list of {type_name(get_args(kind)[0])}"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            type(None): "null"}.get(kind, str(kind))


def apply_settings(model: ModelConfig, train: TrainConfig, settings: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply ``model.KEY=VALUE`` / ``train.KEY=VALUE`` settings (the last one of a key wins), each value typed from
    its field (see :func:`parse_value`) and checked with the rest of its configuration."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for setting in settings:
        name, equals, text = setting.partition("=")
        section, dot, key = name.partition(".")
        names = [f"{part}.{f.name}" for part, cls in SECTIONS.items() for f in fields(cls)]
        if not equals or not dot or name not in names:
            raise UserError(f"--set {setting}: expected model.KEY=VALUE or train.KEY=VALUE with KEY a field of "
                            f"ModelConfig (models/config.py) or TrainConfig (misc/config.py)"
                            f"{did_you_mean(name, names)}")
        changes[section][key] = parse_value(section, key, text)
    # Checked once per section, with every setting in: fields that must agree can change together.
    return replace(model, **changes["model"]), replace(train, **changes["train"])
