"""The joint embedding: both paths side by side; :func:`build_model` is the one way a model is made."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from misc.config import ModelConfig, from_dict
from models.text import TextEncoder
from models.visual import ImageEncoder


class JointEmbedding(nn.Module):
    """Images and captions mapped to the same unit sphere (paper §3); ``config`` is kept as plain data."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image = ImageEncoder(config.trunk, config.maps_dim, config.embed_dim, config.pooling,
                                  config.weldon_k, config.image_dropout)
        self.text = TextEncoder(config.word_dim, config.embed_dim, config.sru_layers, config.text_dropout,
                                config.forget_bias)

    def forward(self, images: torch.Tensor, words: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(images), self.text(words, lengths)


def build_model(config: ModelConfig | dict[str, Any]) -> JointEmbedding:
    """Build the network from a :class:`ModelConfig` or its plain-dict form (as stored in checkpoints)."""
    if isinstance(config, dict):
        config = from_dict(ModelConfig, config)
    return JointEmbedding(config)
