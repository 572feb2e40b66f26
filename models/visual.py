"""Image path (paper eq. 1 and 3): ResNet trunk -> 1x1 conv -> pooling -> dropout -> affine -> l2."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.weldon import build_pooling

TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def build_trunk(name: str) -> tuple[nn.Sequential, int]:
    """A torchvision ResNet up to conv5 (stride 32), randomly initialised; returns it and its channel count D."""
    if not name.startswith(("resnet", "resnext", "wide_resnet")) or name not in torchvision.models.list_models(
            module=torchvision.models):
        raise ValueError(f"unknown trunk {name!r}: use a torchvision ResNet such as resnet18 or resnet152")
    resnet = torchvision.models.get_model(name, weights=None)
    trunk = nn.Sequential(OrderedDict((layer, getattr(resnet, layer)) for layer in TRUNK_LAYERS))
    return trunk, resnet.fc.in_features


class ImageEncoder(nn.Module):
    """Eq. 1: x = l2(A * pool(G) + b) with G = conv1x1(ResNet(image)), the maps kept for localization."""

    def __init__(self, trunk: str, maps_dim: int, embed_dim: int, pooling: str, weldon_k: float,
                 dropout: float) -> None:
        super().__init__()
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

    def load_trunk_weights(self, path: Path) -> None:
        """Initialise the trunk from an ImageNet state dict of the same torchvision ResNet (fc ignored)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        self.trunk.load_state_dict(state, strict=True)
