"""The joint embedding: both paths side by side; :func:`build_model` is the one way a model is made."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from misc.config import from_dict
from models.config import ModelConfig
from models.text import TextEncoder
from models.visual import ImageEncoder

log = logging.getLogger(__name__)

class JointEmbedding(nn.Module):
    """Images and captions mapped to the same unit sphere (paper §3); ``config`` is kept as plain data."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image = ImageEncoder(config.trunk, config.maps_dim, config.embed_dim, config.pooling,
                                  config.weldon_k, config.image_dropout)
        self.text = TextEncoder(config.word_dim, config.embed_dim, config.sru_layers, config.text_dropout,
                                config.rnn_dropout, config.forget_bias)

    def forward(self, images: torch.Tensor, words: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(images), self.text(words, lengths)


def build_model(config: ModelConfig | dict[str, Any], init_trunk: bool = False) -> JointEmbedding:
    """Build the network from a :class:`ModelConfig` or its plain-dict form (as stored in checkpoints).

    ``init_trunk`` starts the trunk from ``config.trunk_init`` (ImageNet weights, a state-dict file or random), for
    a new training run. It is off by default: weights loaded afterwards (a checkpoint) supersede any
    initialisation, so rebuilding a saved model never reads ImageNet weights.
    """
    if isinstance(config, dict):
        config = from_dict(ModelConfig, config)
    model = JointEmbedding(config)
    if init_trunk:
        log.info(model.image.init_trunk(config.trunk_init))
    return model
