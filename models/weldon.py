"""WELDON spatial pooling (paper eq. 2)."""
from __future__ import annotations

import torch
from torch import nn


def resolve_k(k: float, positions: int) -> int:
    """Number of regions kept: ``k`` itself when it is a count (>= 1), else a fraction of ``positions``."""
    count = int(k) if k >= 1 else int(round(k * positions))
    return max(1, min(count, positions))


def weldon_pool(maps: torch.Tensor, k: float) -> torch.Tensor:
    """Eq. 2: per map, mean of the k highest plus mean of the k lowest activations.

    maps: (B, C, h, w) -> (B, C). Gradients flow through ``topk`` only to the selected positions.
    """
    flat = maps.flatten(2)  # (B, C, h*w)
    count = resolve_k(k, flat.shape[-1])
    top = flat.topk(count, dim=-1, largest=True, sorted=False).values
    bottom = flat.topk(count, dim=-1, largest=False, sorted=False).values
    return top.mean(-1) + bottom.mean(-1)


class Weldon(nn.Module):
    """Module form of :func:`weldon_pool`; ``k`` is a count (paper: 15) or a fraction of positions."""

    def __init__(self, k: float = 15) -> None:
        super().__init__()
        self.k = k

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return weldon_pool(maps, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class GlobalAveragePool(nn.Module):
    """Global average pooling, the paper's §4.3 ablation of WELDON."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))


def build_pooling(name: str, k: float) -> nn.Module:
    """Pooling by configuration name: ``weldon`` (default) or ``gap``."""
    if name == "weldon":
        return Weldon(k)
    if name == "gap":
        return GlobalAveragePool()
    raise ValueError(f"unknown pooling {name!r}: use 'weldon' or 'gap'")
