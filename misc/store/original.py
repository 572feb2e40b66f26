"""Reading the original release's files (Engilberge et al., CVPR 2018) into this project's layout.

Two kinds of file come from the release, both saved by torch 1.0 with ``DataParallel`` key prefixes:

- its joint model ``model.pth.tar`` (``epoch``, ``state_dict``, ``best_rec``, ``args_dict``, ``optimizer``):
  :func:`convert_original` renames every weight to this project's keys, infers the network's config from the
  tensors' shapes and keeps the release's text preprocessing (first sentence, case kept) as ``config["text"]``;
- its ImageNet classification network ``pretrained_classif_152_2400.pth.tar``: :func:`classification_state`
  gives the trunk and the 1x1 conv that initialise training (paper §4.1).

This module knows nothing of files on disk: :mod:`misc.store.checkpoint` reads them (with :data:`READABLE_GLOBALS`)
and adds its format header to a conversion.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from misc.config import TrainConfig
from misc.errors import UserError, few
from models.config import ModelConfig
from misc.data.words import ORIGINAL_TEXT

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
RELEASE = "dsve-loc (Engilberge et al., CVPR 2018)"


def kind(data: dict[str, Any]) -> str:
    """``original`` (the release's joint model), ``classification`` (its ImageNet network) or ``unknown``."""
    state = data.get("state_dict")
    if not isinstance(state, dict):
        return "unknown"
    roots = {unparallel(str(key)).split(".")[0] for key in state}
    if roots & {"img_emb", "cap_emb"}:
        return "original"
    if roots & {"base_layer", "spaConv"}:
        return "classification"
    return "unknown"


# --------------------------------------------------------------------------- key mapping

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
        raise UserError(f"{source}: {len(unknown)} keys of the original release's layout have no counterpart in "
                          f"this project's model: {few(unknown)}")
    for key in [key for key in mapped if key.endswith(".running_var")]:
        mapped.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return mapped


def classification_state(data: dict[str, Any], source: Path | str) -> dict[str, torch.Tensor]:
    """The trunk and 1x1-conv weights of the classification network, in our keys; its classifier ``fc`` is left
    out (paper §4.1)."""
    return map_state(data["state_dict"], classification_key, source, ignored=("fc.",))


def describe_classification(data: dict[str, Any], source: Path | str) -> str:
    """One line on what the classification network holds."""
    state = classification_state(data, source)
    classes = data["state_dict"].get("fc.weight", torch.empty(0, 0)).shape[0]
    return (f"{source}: the original release's ImageNet classification network: trunk "
            f"{infer_trunk(state, source)}, 1x1 conv to {state['image.adapt.weight'].shape[0]} maps, "
            f"{classes} classes; initialises training with train.py --init")


# --------------------------------------------------------------------------- the joint model's config

def infer_trunk(state: dict[str, torch.Tensor], source: Path | str) -> str:
    """The torchvision ResNet whose blocks the trunk keys (``image.trunk.layerN.<block>.*``) describe."""
    blocks = tuple(len({key.split(".")[3] for key in state if key.startswith(f"image.trunk.layer{stage}.")})
                   for stage in range(1, 5))
    bottleneck = "image.trunk.layer1.0.conv3.weight" in state
    name = RESNETS.get((bottleneck, blocks))
    if name is None:
        raise UserError(f"{source}: its trunk has {blocks} {'bottleneck' if bottleneck else 'basic'} blocks per "
                          f"stage, which is none of ResNet-18/34/50/101/152")
    return name


def original_model_config(state: dict[str, torch.Tensor], args: dict[str, Any], source: Path | str) -> ModelConfig:
    """The network of an original joint model, from its tensors' shapes (checked against its arguments)."""
    needed = {"image.adapt.weight": "img_emb.module.base_layer.1.weight", "image.proj.weight": "fc.module.weight",
              "text.rnn.rnn_lst.0.weight": "cap_emb.rnn.rnn_lst.0.weight"}
    absent = [original for ours, original in needed.items() if ours not in state]
    if absent:
        raise UserError(f"{source}: the original model lacks {', '.join(absent)}")
    maps_dim = state["image.adapt.weight"].shape[0]  # (D', D, 1, 1)
    embed_dim = state["image.proj.weight"].shape[0]  # (d, D')
    word_dim = state["text.rnn.rnn_lst.0.weight"].shape[0]  # (word_dim, k d)
    sru_layers = len({key.split(".")[3] for key in state if key.startswith("text.rnn.rnn_lst.")})
    for name, inferred in (("sru", sru_layers), ("dimemb", embed_dim)):
        if name in args and args[name] != inferred:
            raise UserError(f"{source}: its arguments say {name}={args[name]} but its tensors hold {inferred}")
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
    """An original ``model.pth.tar`` (already read) as the body of a checkpoint of this project's format (its
    ``format`` and ``version`` header is :mod:`misc.store.checkpoint`'s to add).

    Every original key is mapped (:func:`original_key`); the optimizer state is dropped (another parameter
    layout), the training arguments, epoch and ``best_rec`` are kept as plain data under ``origin``.
    """
    state = map_state(data["state_dict"], original_key, source)
    args = plain(data.get("args_dict"))
    args = args if isinstance(args, dict) else {}
    model = original_model_config(state, args, source)
    train = TrainConfig(dataset="coco", **{key: args[key] for key in ("batch_size", "lr")
                                           if isinstance(args.get(key), (int, float))})
    return {"config": {"model": asdict(model), "train": asdict(train), "word_vectors": None,
                       "text": asdict(ORIGINAL_TEXT)},
            "model": state, "epoch": plain(data.get("epoch")), "metrics": {},
            "origin": {"release": RELEASE, "file": Path(source).name, "args": args,
                       "best_rec": plain(data.get("best_rec"))}}
