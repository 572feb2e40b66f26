"""Image path (paper eq. 1 and 3): CNN trunk -> 1x1 conv -> pooling -> dropout -> affine -> l2. The trunks
themselves (torchvision, timm) and their weights are in :mod:`models.trunks`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.trunks import build_trunk, init_trunk
from models.weldon import build_pooling


class ImageEncoder(nn.Module):
    """Eq. 1: x = l2(A * pool(G) + b) with G = conv1x1(CNN(image)), the maps kept for localization; the CNN is
    any trunk of :mod:`models.trunks` at its last conv stage (stride 32 for ResNets)."""

    def __init__(self, trunk: str, maps_dim: int, embed_dim: int, pooling: str, weldon_k: float,
                 dropout: float) -> None:
        super().__init__()
        self.trunk_name = trunk
        self.grid = build_trunk(trunk)  # the trunk with its channels, stride and stages
        self.trunk = self.grid.module
        self.adapt = nn.Conv2d(self.grid.channels, maps_dim, kernel_size=1)
        self.pool = build_pooling(pooling, weldon_k)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(maps_dim, embed_dim)  # A, b of eq. 1

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps G of eq. 3: (B, 3, H, W) -> (B, D', H/stride, W/stride), stride 32 for ResNets."""
        return self.adapt(self.trunk(images))

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Pool, project and normalise maps G: (B, D', h, w) -> (B, d) unit vectors."""
        return F.normalize(self.proj(self.dropout(self.pool(maps))).float(), dim=-1)  # fp32 norm under AMP

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_maps(self.feature_maps(images))

    def init_trunk(self, source: str) -> str:
        """Start the trunk from ``source`` (:func:`models.trunks.init_trunk`); returns what was done, in one line."""
        return init_trunk(self.grid, self.trunk_name, source)
