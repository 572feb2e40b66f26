"""Checkpoints: one format, plain data only (loads with ``weights_only=True``), written atomically.

A checkpoint is a dict::

    {"format": "dsve-loc", "version": 1,
     "config": {"model": ModelConfig as dict, "train": TrainConfig as dict, "word_vectors": path,
                "text": TextOptions as dict (optional; absent means this project's tokenisation)},
     "model": state_dict, "epoch": epochs completed, "best_rsum": float, "metrics": dict,
     # training checkpoints also carry
     "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": {"torch", "cuda", "python"}}

The model config alone rebuilds the network (:func:`models.joint.build_model`).

The original release's files are read as they are:

- its joint model ``model.pth.tar`` (``epoch``, ``state_dict``, ``best_rec``, ``args_dict``, ``optimizer``) is
  converted in memory by :func:`load`, so every CLI takes it; ``python -m misc.checkpoint convert IN OUT`` writes
  the conversion in this format. Its config is inferred from the tensors' shapes, and its text preprocessing
  (first sentence, case kept) travels as ``config["text"]`` and is applied by :func:`load_words`;
- its ImageNet classification network ``pretrained_classif_152_2400.pth.tar`` initialises the trunk and the 1x1
  conv before training (paper §4.1, :func:`init_from`).

    python -m misc.checkpoint convert model.pth.tar runs/original.pth.tar
    python -m misc.checkpoint inspect model.pth.tar
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from misc import config
from misc.cli import run
from misc.files import atomic_path
from misc.config import ROOT, ConfigError, ModelConfig, TrainConfig
from misc.words import ORIGINAL_TEXT, TextOptions, WordVectors, load_word_vectors
from models.joint import JointEmbedding, build_model

FORMAT = "dsve-loc"
VERSION = 1

# The original image path is DataParallel(Sequential(Sequential(ResNet children up to layer4), 1x1 conv, WELDON)):
# its ResNet children are numbered, 2 (relu) and 3 (maxpool) have no weights.
ORIGINAL_TRUNK = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
ORIGINAL_WELDON_K = 15  # k highest and k lowest regions (paper §3)
# Besides plain data, the original release's model.pth.tar pickles its training arguments (argparse.Namespace) and
# ``best_rec``, a numpy float64 (a sum of numpy recalls): numpy's scalar constructor under the name a file of 2018
# (numpy 1) or of numpy 2 gives it, and the dtype it is built with. The weights-only unpickler still refuses any
# other global.
READABLE_GLOBALS: list[Any] = [argparse.Namespace, np.dtype, np.dtypes.Float64DType,
                               (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                               (np._core.multiarray.scalar, "numpy._core.multiarray.scalar")]
# (bottleneck blocks?, blocks per stage) -> torchvision ResNet
RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50",
           (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152"}


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see half a file."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def portable_path(path: Path | str | None) -> str | None:
    """Store paths inside the project relative to it, so a checkpoint keeps working in another clone."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def resolve_path(stored: str | None) -> Path | None:
    if stored is None:
        return None
    candidate = Path(stored)
    return candidate if candidate.is_absolute() else ROOT / candidate


def read(path: Path | str) -> dict[str, Any]:
    """Load any checkpoint file as plain data, with a one-line error for files that are not one.

    Only :data:`READABLE_GLOBALS` are allowed besides plain data, through ``torch.load(weights_only=True)``, for
    both torch file formats (the original release's torch 1.0 files are the legacy, non-zip one).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(READABLE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsupported:
            raise ConfigError(f"{path} holds Python objects ({unsupported[1]}), not plain data: it is not a "
                              f"checkpoint this code reads") from error
        raise ConfigError(f"{path} is not a readable checkpoint (truncated or not a torch file?): "
                          f"{first_line(error)}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"{path} is not a readable checkpoint (truncated or not a torch file?): "
                          f"{first_line(error)}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a checkpoint: it holds a {type(data).__name__}, not a dict")
    return data


def first_line(error: BaseException) -> str:
    """The error's type and first sentence, for a one-line message."""
    text = str(error).strip()
    sentence = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def load(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint of this project's format, or the original release's ``model.pth.tar`` converted to it."""
    return as_checkpoint(read(path), path)


def as_checkpoint(data: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """The checkpoint in ``data`` (read from ``path``) in this project's format; one-line errors otherwise."""
    found = kind(data)
    if found == "original":
        return convert_original(data, path)
    if found == "classification":
        raise ConfigError(f"{path} is the original release's ImageNet classification network, not a joint model; "
                          f"it initialises training: train.py --init {path}")
    if found != FORMAT:
        raise ConfigError(f"{path} is neither a DSVE-Loc checkpoint (no 'format': '{FORMAT}' key) nor an original "
                          f"dsve-loc model.pth.tar; its keys: {few(data)}")
    if data.get("version", 0) > VERSION:
        raise ConfigError(f"{path} has format version {data['version']}; this code reads up to {VERSION}")
    return data


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[JointEmbedding, dict[str, Any]]:
    """Rebuild the network of a checkpoint, load its weights, move it to ``device`` in eval mode."""
    data = load(path)
    model = build_model(data["config"]["model"])
    load_weights(model, data["model"], path)
    return model.to(device).eval(), data


def load_words(state: dict[str, Any], override_path: Path | str | None = None,
               checkpoint_path: Path | str | None = None) -> WordVectors:
    """The word vectors of a loaded checkpoint, with its text preprocessing, checked against its text path.

    The file is ``override_path`` (a CLI's ``--words``), else the one the checkpoint names, else config key
    ``word_vectors`` (the demo world's when the checkpoint trained on it); converted original models name none,
    so they use the configured skip-thought table. ``checkpoint_path`` only names the checkpoint in errors.
    """
    saved = state["config"]
    path = (override_path or resolve_path(saved.get("word_vectors"))
            or config.path("word_vectors", demo=saved["train"].get("dataset") == "demo"))
    text = saved.get("text") or {}
    known = {f.name for f in fields(TextOptions)}
    if set(text) - known:
        raise ConfigError(f"{checkpoint_path or 'checkpoint'}: unknown text options {sorted(set(text) - known)}; "
                          f"known: {sorted(known)}")
    words = load_word_vectors(Path(path), TextOptions(**text))
    expected = saved["model"]["word_dim"]
    if words.dim != expected:
        raise ConfigError(f"word vectors {words.source} are {words.dim}-d but {checkpoint_path or 'the checkpoint'} "
                          f"expects {expected}-d (model.word_dim); pass --words with the vectors it was trained with")
    return words


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside any wrapper (DDP, compile)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the bare model, whatever wrapper (DDP, compile) is around it."""
    return unwrap(model).state_dict()


def few(keys: Iterable[str], count: int = 3) -> str:
    """A few of ``keys`` for a one-line message."""
    names = sorted(map(str, keys))
    shown = ", ".join(names[:count])
    return f"{shown} (+{len(names) - count} more)" if len(names) > count else shown


def check_state(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: Path | str) -> None:
    """One line naming a few missing, unexpected and mis-shaped keys when ``given`` does not fit ``expected``."""
    missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
    shapes = [f"{key} {tuple(given[key].shape)} instead of {tuple(expected[key].shape)}"
              for key in sorted(expected.keys() & given.keys()) if given[key].shape != expected[key].shape]
    problems = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + \
               ([f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else []) + \
               ([f"{len(shapes)} of another shape ({few(shapes, 2)})"] if shapes else [])
    if problems:
        raise ConfigError(f"{source}: weights do not fit the model: {'; '.join(problems)}")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load every weight of ``model`` from ``state``, strictly, with :func:`check_state`'s one-line errors."""
    model = unwrap(model)
    check_state(model.state_dict(), state, source)
    model.load_state_dict(state)


def init_from(model: nn.Module, path: Path | str) -> str:
    """Initialise ``model`` for training (``train.py --init``) and say what was loaded.

    - the original release's classification network (``pretrained_classif_152_2400.pth.tar``): the trunk and the
      1x1 conv, strictly; its 1000-class classifier is not used (paper §4.1, image pipeline);
    - an original ``model.pth.tar`` or a checkpoint of this project: every weight, strictly.
    """
    data = read(path)
    if kind(data) == "classification":
        given = map_state(data["state_dict"], classification_key, path, ignored=("fc.",))
        bare = unwrap(model)
        expected = {key: value for key, value in bare.state_dict().items()
                    if key.startswith(("image.trunk.", "image.adapt."))}
        check_state(expected, given, path)
        bare.load_state_dict(given, strict=False)  # exactly the trunk and the 1x1 conv, checked above
        return (f"initialised the trunk ({infer_trunk(given, path)}) and the 1x1 conv ({len(given)} tensors) from "
                f"{path}; its ImageNet classifier is not used")
    state = as_checkpoint(data, path)
    load_weights(model, state["model"], path)
    origin = "the original release's model" if "origin" in state else "checkpoint"
    return f"initialised every weight ({len(state['model'])} tensors) from {origin} {path}"


# --------------------------------------------------------------------------- the original release's files

def kind(data: dict[str, Any]) -> str:
    """``dsve-loc`` (this project), ``original`` (the release's joint model), ``classification`` (its ImageNet
    network) or ``unknown``."""
    if data.get("format") == FORMAT:
        return FORMAT
    state = data.get("state_dict")
    if not isinstance(state, dict):
        return "unknown"
    roots = {unparallel(str(key)).split(".")[0] for key in state}
    if roots & {"img_emb", "cap_emb"}:
        return "original"
    if roots & {"base_layer", "spaConv"}:
        return "classification"
    return "unknown"


def unparallel(key: str) -> str:
    """A state-dict key without the ``module.`` segments that ``DataParallel`` adds."""
    return ".".join(part for part in key.split(".") if part != "module")


def trunk_key(child: str, rest: list[str]) -> str | None:
    """Our name for a weight of the original ResNet Sequential: its ``child`` index and the rest of the key."""
    return ".".join(["image.trunk", ORIGINAL_TRUNK[child], *rest]) if child in ORIGINAL_TRUNK and rest else None


def original_key(key: str) -> str | None:
    """This project's key for a key of the original joint model, None when it has none.

    ``img_emb.module.base_layer.0.<i>.*`` -> ``image.trunk.<conv1|bn1|layer1..4>.*``,
    ``img_emb.module.base_layer.1.*`` -> ``image.adapt.*`` (1x1 conv), ``fc.module.*`` -> ``image.proj.*`` (A, b
    of eq. 1), ``cap_emb.rnn.*`` -> ``text.rnn.*`` (the same SRU, eq. 4).
    """
    match unparallel(key).split("."):
        case ["img_emb", "base_layer", "0", child, *rest]:
            return trunk_key(child, rest)
        case ["img_emb", "base_layer", "1", ("weight" | "bias") as name]:
            return f"image.adapt.{name}"
        case ["fc", ("weight" | "bias") as name]:
            return f"image.proj.{name}"
        case ["cap_emb", "rnn", *rest] if rest:
            return ".".join(["text.rnn", *rest])
    return None


def classification_key(key: str) -> str | None:
    """This project's key for a trunk or 1x1-conv key of the original classification network."""
    match unparallel(key).split("."):
        case ["base_layer", child, *rest]:
            return trunk_key(child, rest)
        case ["spaConv", ("weight" | "bias") as name]:
            return f"image.adapt.{name}"
    return None


def map_state(state: dict[str, Any], rename: Callable[[str], str | None], source: Path | str,
              ignored: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename every key of an original state dict; a key with no counterpart (not ``ignored``) is an error.

    BatchNorm layers saved by torch < 0.4.1 have no ``num_batches_tracked``; it is added as 0, what a fresh
    layer holds (evaluation does not use it).
    """
    mapped, unknown = {}, []
    for key, value in state.items():
        if unparallel(key).startswith(ignored):
            continue
        name = rename(key)
        if name is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
        else:
            mapped[name] = value
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} keys of the original release's layout have no counterpart in "
                          f"this project's model: {few(unknown)}")
    for key in [key for key in mapped if key.endswith(".running_var")]:
        mapped.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return mapped


def infer_trunk(state: dict[str, torch.Tensor], source: Path | str) -> str:
    """The torchvision ResNet whose blocks the trunk keys (``image.trunk.layerN.<block>.*``) describe."""
    blocks = tuple(len({key.split(".")[3] for key in state if key.startswith(f"image.trunk.layer{stage}.")})
                   for stage in range(1, 5))
    bottleneck = "image.trunk.layer1.0.conv3.weight" in state
    name = RESNETS.get((bottleneck, blocks))
    if name is None:
        raise ConfigError(f"{source}: its trunk has {blocks} {'bottleneck' if bottleneck else 'basic'} blocks per "
                          f"stage, which is none of ResNet-18/34/50/101/152")
    return name


def original_model_config(state: dict[str, torch.Tensor], args: dict[str, Any], source: Path | str) -> ModelConfig:
    """The network of an original joint model, from its tensors' shapes (checked against its arguments)."""
    needed = {"image.adapt.weight": "img_emb.module.base_layer.1.weight", "image.proj.weight": "fc.module.weight",
              "text.rnn.rnn_lst.0.weight": "cap_emb.rnn.rnn_lst.0.weight"}
    absent = [original for ours, original in needed.items() if ours not in state]
    if absent:
        raise ConfigError(f"{source}: the original model lacks {', '.join(absent)}")
    maps_dim = state["image.adapt.weight"].shape[0]  # (D', D, 1, 1)
    embed_dim = state["image.proj.weight"].shape[0]  # (d, D')
    word_dim = state["text.rnn.rnn_lst.0.weight"].shape[0]  # (word_dim, k d)
    sru_layers = len({key.split(".")[3] for key in state if key.startswith("text.rnn.rnn_lst.")})
    for name, inferred in (("sru", sru_layers), ("dimemb", embed_dim)):
        if name in args and args[name] != inferred:
            raise ConfigError(f"{source}: its arguments say {name}={args[name]} but its tensors hold {inferred}")
    return ModelConfig(trunk=infer_trunk(state, source), maps_dim=maps_dim, embed_dim=embed_dim, pooling="weldon",
                       weldon_k=ORIGINAL_WELDON_K, word_dim=word_dim, sru_layers=sru_layers)


def plain(value: Any) -> Any:
    """``value`` as plain data (str, numbers, bool, None, lists, dicts) so the result loads with weights_only."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def convert_original(data: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """An original ``model.pth.tar`` (already read) as a checkpoint of this project's format.

    Every original key is mapped (:func:`original_key`); the optimizer state is dropped (another parameter
    layout), the training arguments, epoch and ``best_rec`` are kept as plain data under ``origin``.
    """
    state = map_state(data["state_dict"], original_key, source)
    args = plain(data.get("args_dict"))
    args = args if isinstance(args, dict) else {}
    model = original_model_config(state, args, source)
    train = TrainConfig(dataset="coco", **{key: args[key] for key in ("batch_size", "lr")
                                           if isinstance(args.get(key), (int, float))})
    return {"format": FORMAT, "version": VERSION,
            "config": {"model": asdict(model), "train": asdict(train), "word_vectors": None,
                       "text": asdict(ORIGINAL_TEXT)},
            "model": state, "epoch": plain(data.get("epoch")), "metrics": {},
            "origin": {"release": "dsve-loc (Engilberge et al., CVPR 2018)", "file": Path(source).name,
                       "args": args, "best_rec": plain(data.get("best_rec"))}}


def convert_file(source: Path, out: Path) -> str:
    """Convert an original ``model.pth.tar`` to this project's format at ``out`` (checked to load first)."""
    data = read(source)
    if kind(data) != "original":
        raise ConfigError(f"{source}: not an original dsve-loc model.pth.tar (kind: {kind(data)}); convert reads "
                          f"the original release's joint model only")
    converted = convert_original(data, source)
    load_weights(build_model(converted["config"]["model"]), converted["model"], source)
    atomic_save(converted, out)
    return f"{source} -> {out}: {summary(converted['config']['model'])}"


def summary(model: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in model.items())


def describe(path: Path) -> str:
    """A few lines on what a checkpoint file holds."""
    data = read(path)
    found = kind(data)
    if found == "classification":
        state = map_state(data["state_dict"], classification_key, path, ignored=("fc.",))
        classes = data["state_dict"].get("fc.weight", torch.empty(0, 0)).shape[0]
        return (f"{path}: the original release's ImageNet classification network: trunk "
                f"{infer_trunk(state, path)}, 1x1 conv to {state['image.adapt.weight'].shape[0]} maps, "
                f"{classes} classes; initialises training with train.py --init")
    state = as_checkpoint(data, path)
    saved = state["config"]
    tensors = state["model"].values()
    origin = state.get("origin", {}).get("file")
    what = ("original dsve-loc model (converted on loading)" if found == "original" else
            f"DSVE-Loc checkpoint{f' converted from the original release {origin}' if origin else ''}")
    lines = [f"{path}: {what}",
             f"model: {summary(saved['model'])}",
             f"text: {summary(saved.get('text') or asdict(TextOptions()))}",
             f"word vectors: {saved.get('word_vectors') or 'none named (config key word_vectors)'}",
             f"epoch: {state.get('epoch')}; {len(state['model'])} tensors, "
             f"{sum(t.numel() for t in tensors if t.is_floating_point()) / 1e6:.1f} M values"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m misc.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write an original model.pth.tar in this project's format")
    convert.add_argument("source", type=Path, help="the original release's model.pth.tar")
    convert.add_argument("out", type=Path, help="checkpoint to write")
    inspect = commands.add_parser("inspect", help="say what a checkpoint file holds")
    inspect.add_argument("file", type=Path)
    args = parser.parse_args()
    print(convert_file(args.source, args.out) if args.command == "convert" else describe(args.file))


if __name__ == "__main__":
    run(main)
