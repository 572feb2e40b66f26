"""DSVE's joint embedding (paper §3): both paths side by side; and :func:`build_model`, the one way a model of
either system (models/system.py) is made."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from models.checks import from_dict
from models.config import ModelConfig
from models.heatmaps import text_filters
from models.matchmap import Matchmap
from models.system import System
from models.text import TextEncoder
from models.visual import ImageEncoder

log = logging.getLogger(__name__)


class JointEmbedding(System):
    """Images and captions mapped to the same unit sphere (paper §3); ``config`` is kept as plain data."""

    PARTS = ("projection", "SRU", "1x1 conv", "trunk")
    uses_k = True
    starts_from_original_release = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image = ImageEncoder(config.trunk, config.maps_dim, config.embed_dim, config.pooling,
                                  config.weldon_k, config.image_dropout)
        self.text = TextEncoder(config.word_dim, config.embed_dim, config.sru_layers, config.text_dropout,
                                config.rnn_dropout, config.forget_bias)

    def score(self, images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities s(x_i, y_j) of unit embeddings (Bi, d) and (Bt, d) -> (Bi, Bt); ``lengths`` is
        not needed here."""
        return images @ texts.t()

    @property
    def vector_dim(self) -> int:
        return self.config.embed_dim

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """The unit embedding x of eq. 1 (B, d)."""
        return self.image(images)

    def text_vectors(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The unit embedding y of eq. 4 (B, d)."""
        return self.text(words, lengths)

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps G of eq. 3 (B, D', h, w)."""
        return self.image.feature_maps(images)

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Eq. 1 from the maps G: pooled, projected, normalised (B, d)."""
        return self.image.embed_maps(maps)

    def image_output(self, maps: torch.Tensor) -> torch.Tensor:
        return self.embed_maps(maps)

    def text_filters(self, words: torch.Tensor, lengths: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Eq. 9's filter f = sum_{u in K(y)} |y_u| A_u of each text's embedding y (eq. 4): (Q, D'); ``k`` is
        required (models/heatmaps.py)."""
        if k is None:
            raise ValueError("DSVE heatmaps need k, the number of embedding dimensions kept (eq. 9)")
        return text_filters(self.image.proj.weight, self.text(words, lengths), k)

    def parts(self) -> dict[str, nn.Module]:
        return {"projection": self.image.proj, "SRU": self.text, "1x1 conv": self.image.adapt,
                "trunk": self.image.trunk}

    @staticmethod
    def config_dims(config: ModelConfig) -> list[tuple[str, str, int, int]]:
        last = f"text.rnn.rnn_lst.{config.sru_layers - 1}.weight_c"  # the SRU's last layer (2 d,)
        return [("maps_dim", "image.adapt.weight", 0, config.maps_dim),
                ("maps_dim", "image.proj.weight", 1, config.maps_dim),
                ("embed_dim", "image.proj.weight", 0, config.embed_dim),
                ("word_dim", "text.rnn.rnn_lst.0.weight", 0, config.word_dim),
                ("sru_layers", last, 0, 2 * config.embed_dim)]


Model = System
SYSTEMS: dict[str, type[System]] = {"dsve": JointEmbedding, "matchmap": Matchmap}  # ModelConfig.arch


def system_class(arch: str) -> type[System]:
    """The class of the system ``model.arch`` names, for what it declares before it is built (its parts)."""
    return SYSTEMS[arch]


def build_model(config: ModelConfig | dict[str, Any], init_trunk: bool = False) -> System:
    """Build the network of ``config.arch`` from a :class:`ModelConfig` or its plain-dict form (as stored in
    checkpoints).

    ``init_trunk`` starts the trunk from ``config.trunk_init`` (ImageNet weights, a state-dict file or random), for
    a new training run. It is off by default: weights loaded afterwards (a checkpoint) supersede any
    initialisation, so rebuilding a saved model never reads ImageNet weights.
    """
    if isinstance(config, dict):
        config = from_dict(ModelConfig, config)
    model = system_class(config.arch)(config)
    if init_trunk:
        log.info(model.image.init_trunk(config.trunk_init))
    return model
