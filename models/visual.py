"""Image path (paper eq. 1 and 3): ResNet trunk -> 1x1 conv -> pooling -> dropout -> affine -> l2; and the CNN
trunks both systems cut into feature grids (:func:`build_grid_trunk`), with their ImageNet initialisation."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from misc.errors import UserError, check_choice
from models.weldon import build_pooling

TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
RESNET_CUTS = ("layer2", "layer3", "layer4")  # strides 8, 16, 32
VGG_CUTS = ("conv3", "conv4", "conv5")  # a block's last conv and ReLU, before its pooling: strides 4, 8, 16
IMAGENET_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")  # torchvision's ImageNet weights of its ResNets


def trunk_names(families: tuple[str, ...]) -> list[str]:
    """torchvision's classification networks whose names start with one of ``families``."""
    return [model for model in torchvision.models.list_models(module=torchvision.models) if model.startswith(families)]


def build_trunk(name: str) -> tuple[nn.Sequential, int]:
    """A torchvision ResNet up to conv5 (stride 32), randomly initialised; returns it and its channel count D."""
    check_choice("model.trunk", name, trunk_names(("resnet", "resnext", "wide_resnet")))
    trunk, channels, _ = build_grid_trunk(name, "layer4")
    return trunk, channels


def build_grid_trunk(name: str, cut: str = "") -> tuple[nn.Sequential, int, tuple[str, ...]]:
    """A torchvision ResNet or VGG without its last pooling, cut after stage ``cut`` (default: its last one,
    ``layer4`` or ``conv5``), randomly initialised. Returns the trunk, its channel count and the state-dict
    prefixes of the whole network that the trunk leaves out (its classifier, the stages after the cut).

    The trunk's state-dict keys are torchvision's (``layer3.0.conv1.weight``, ``features.34.weight``), so that
    torchvision's ImageNet files load into it (:func:`load_trunk_state`). VGG-19 cut at ``conv5`` is conv5_4 + ReLU:
    512 x 14 x 14 at 224 x 224; ResNet-50 cut at ``layer3``: 1024 x 14 x 14.
    """
    check_choice("model.trunk", name, trunk_names(("resnet", "resnext", "wide_resnet", "vgg")))
    network = torchvision.models.get_model(name, weights=None)
    if name.startswith("vgg"):
        check_choice("model.trunk_cut", cut or "conv5", VGG_CUTS)
        pools = [index for index, layer in enumerate(network.features) if isinstance(layer, nn.MaxPool2d)]
        end = pools[int((cut or "conv5")[-1]) - 1]
        features = network.features[:end]
        channels = [layer.out_channels for layer in features if isinstance(layer, nn.Conv2d)][-1]
        dropped = ("classifier.",) + tuple(f"features.{index}." for index in range(end, len(network.features)))
        return nn.Sequential(OrderedDict(features=features)), channels, dropped
    check_choice("model.trunk_cut", cut or "layer4", RESNET_CUTS)
    layers = TRUNK_LAYERS[:TRUNK_LAYERS.index(cut or "layer4") + 1]
    trunk = nn.Sequential(OrderedDict((layer, getattr(network, layer)) for layer in layers))
    channels = network.fc.in_features // 2 ** (len(TRUNK_LAYERS) - len(layers))
    return trunk, channels, ("fc.",) + tuple(f"{layer}." for layer in TRUNK_LAYERS[len(layers):])


def init_trunk(trunk: nn.Sequential, name: str, source: str, dropped: tuple[str, ...] = ("fc.",)) -> str:
    """Start ``trunk`` (torchvision's ``name`` network, less the ``dropped`` keys) from ``source``
    (``ModelConfig.trunk_init``, see :func:`trunk_weights_file`); returns what was done, in one line."""
    if source == "scratch":
        return f"trunk ({name}) randomly initialised"
    path = trunk_weights_file(name, source)
    load_trunk_state(trunk, read_state_dict(path), f"{path} (the {name} trunk)", dropped)
    return f"trunk ({name}) initialised from {path}"


class ImageEncoder(nn.Module):
    """Eq. 1: x = l2(A * pool(G) + b) with G = conv1x1(ResNet(image)), the maps kept for localization."""

    def __init__(self, trunk: str, maps_dim: int, embed_dim: int, pooling: str, weldon_k: float,
                 dropout: float) -> None:
        super().__init__()
        self.trunk_name = trunk
        self.trunk, trunk_dim = build_trunk(trunk)
        self.adapt = nn.Conv2d(trunk_dim, maps_dim, kernel_size=1)
        self.pool = build_pooling(pooling, weldon_k)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(maps_dim, embed_dim)  # A, b of eq. 1

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps G of eq. 3: (B, 3, H, W) -> (B, D', H/32, W/32)."""
        return self.adapt(self.trunk(images))

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Pool, project and normalise maps G: (B, D', h, w) -> (B, d) unit vectors."""
        return F.normalize(self.proj(self.dropout(self.pool(maps))).float(), dim=-1)  # fp32 norm under AMP

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_maps(self.feature_maps(images))

    def init_trunk(self, source: str) -> str:
        """Start the trunk from ``source`` (:func:`init_trunk`); returns what was done, in one line."""
        return init_trunk(self.trunk, self.trunk_name, source)


def imagenet_file(trunk: str, name: str) -> Path:
    """Where torchvision keeps its ``name`` ImageNet weights of ``trunk``: torch hub's cache. Nothing is
    downloaded: a file not cached is a one-line error saying where to put it."""
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


def trunk_weights_file(trunk: str, source: str) -> Path:
    """The state-dict file of a trunk source: ``IMAGENET1K_V1`` / ``IMAGENET1K_V2`` (torchvision's, from torch
    hub's cache) or ``file:PATH`` (a torchvision-format state dict, e.g. resnet152-394f9c45.pth)."""
    if source in IMAGENET_WEIGHTS:
        return imagenet_file(trunk, source)
    if source.startswith("file:"):
        path = Path(source.removeprefix("file:")).expanduser()
        if not path.is_file():
            raise UserError(f"trunk weights {path} not found")
        return path
    raise UserError(f"model.trunk_init={source!r}: expected scratch, {' or '.join(IMAGENET_WEIGHTS)} or file:PATH"
                      + (" (checkpoint sources are loaded by misc.checkpoint.init_from)"
                         if source.startswith("checkpoint:") else ""))


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


def load_trunk_state(trunk: nn.Sequential, state: dict[str, torch.Tensor], source: str,
                     dropped: tuple[str, ...] = ("fc.",)) -> None:
    """Load a torchvision state dict into ``trunk``: every trunk tensor must be there with its shape, and
    nothing else but the ``dropped`` keys (the classifier ``fc.*``, or whatever :func:`build_grid_trunk` cut off),
    which the trunk does not have. Batch-norm counters (``num_batches_tracked``) may be absent, as in
    torchvision's files saved before they existed."""
    given = {key: value for key, value in state.items() if not key.startswith(dropped)}
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
