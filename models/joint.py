"""Both systems: DSVE's joint embedding (both paths side by side) and the matchmap model of models/matchmap.py;
:func:`build_model` is the one way a model of either is made.

Both models offer the same interface to training and localization:
    model(images, words, lengths) -> (image output, text output)   the two parts' outputs of a batch
    model.score(image output, text output, lengths) -> (Bi, Bt)     every image against every caption
    model.maps(images) -> (B, C, h, w)                              the maps heatmaps are read from
    model.text_filters(words, lengths, k) -> (Q, C)                 one filter per text
    model.heatmaps(images, words, lengths, k) -> (B, Q, h, w)       filters applied at every position
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from misc.config import from_dict
from misc.eval.localization import apply_filters, text_filters
from models.config import ModelConfig
from models.matchmap import Matchmap
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

    def score(self, images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities s(x_i, y_j) of unit embeddings (Bi, d) and (Bt, d) -> (Bi, Bt); ``lengths`` is
        not needed here."""
        return images @ texts.t()

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps G of eq. 3 (B, D', h, w)."""
        return self.image.feature_maps(images)

    def text_filters(self, words: torch.Tensor, lengths: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Eq. 9's filter f = sum_{u in K(y)} |y_u| A_u of each text's embedding y (eq. 4): (Q, D'); ``k`` is
        required."""
        if k is None:
            raise ValueError("DSVE heatmaps need k, the number of embedding dimensions kept (eq. 9)")
        return text_filters(self.image.proj.weight, self.text(words, lengths), k)

    def heatmaps(self, images: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor,
                 k: int | None = None) -> torch.Tensor:
        """Eq. 9 for each text on each image: (B, Q, h, w)."""
        return apply_filters(self.maps(images), self.text_filters(words, lengths, k))


Model = JointEmbedding | Matchmap


def build_model(config: ModelConfig | dict[str, Any], init_trunk: bool = False) -> Model:
    """Build the network of ``config.arch`` from a :class:`ModelConfig` or its plain-dict form (as stored in
    checkpoints).

    ``init_trunk`` starts the trunk from ``config.trunk_init`` (ImageNet weights, a state-dict file or random), for
    a new training run. It is off by default: weights loaded afterwards (a checkpoint) supersede any
    initialisation, so rebuilding a saved model never reads ImageNet weights.
    """
    if isinstance(config, dict):
        config = from_dict(ModelConfig, config)
    model = Matchmap(config) if config.arch == "matchmap" else JointEmbedding(config)
    if init_trunk:
        log.info(model.image.init_trunk(config.trunk_init))
    return model
