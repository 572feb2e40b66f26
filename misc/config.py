"""Every dataset and weight path, and every hyper-parameter default.

Paths: each key has a default under the data root :data:`DATA` and an environment variable that overrides it
(``DSVE_<KEY>``). :func:`path` resolves a key and fails with one line naming the key, the expected file and where it
comes from. The data root is ``DSVE_DATA`` when set; else, in a clone, the clone's ``data/``; else (the installed
package) the working directory's ``data/``, never the installed package's folder. Training runs go to ``runs/``
beside it in the same way. Hyper-parameters are plain dataclasses (the named settings over them: misc/presets.py).
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

    # coco | flickr30k | flickr30k_entities | demo | a JSON-lines file, or a list of them: each one's split,
    # concatenated, validated on the first one's val_split (misc/data/mix.py); one dataset stays a name
    dataset: str | list[str] = "coco"
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
        if isinstance(self.dataset, list):
            if not self.dataset or len(set(self.dataset)) < len(self.dataset):
                raise UserError(f"train.dataset = {self.dataset}: expected a dataset or a list of different ones")
            self.dataset = self.dataset[0] if len(self.dataset) == 1 else self.dataset
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

    @property
    def datasets(self) -> list[str]:
        """The training datasets in order (the first one's ``val_split`` validates)."""
        return dataset_names(self.dataset)


def dataset_names(dataset: str | list[str]) -> list[str]:
    """``train.dataset`` (of a config or a checkpoint's plain data) as a list of names."""
    return [dataset] if isinstance(dataset, str) else list(dataset)


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
