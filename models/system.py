"""The interface both systems implement (DSVE, models/joint.py; the matchmap, models/matchmap.py), so that training,
retrieval and localization never ask which system they hold.

    model(images, words, lengths) -> (image output, text output)   the two parts' outputs of a batch
    model.score(image output, text output, lengths) -> (Bi, Bt)     every image against every caption
    model.embeddable, model.vector_dim                              whether one vector per side gives the score
    model.image_vectors(images) -> (B, d)                           those vectors (retrieval, extraction)
    model.text_vectors(words, lengths) -> (B, d)
    model.maps(images) -> (B, C, h, w)                              the maps heatmaps are read from
    model.embed_maps(maps) -> (B, d); model.image_output(maps)      an image's vector / score input from its maps
    model.text_filters(words, lengths, k) -> (Q, C)                 one filter per text
    model.phrase_filters(words, lengths, spans) -> (Q, C)           one per token span of a caption read whole
    model.heatmaps(images, words, lengths, k) -> (B, Q, h, w)       filters applied at every position
    model.parts() -> {name: module}                                 the trainable parts, in :attr:`PARTS` order
    System.config_dims(config) -> [(field, tensor, axis, size)]     where the config's sizes show in the weights
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.heatmaps import apply_filters


class System(nn.Module):
    """What a system declares (class attributes) and implements; ``image`` and ``text`` are its two paths, the
    image one with a trunk (``image.trunk``, ``image.grid``) that ``image.init_trunk(source)`` starts."""

    #: trainable parts in schedule order: the first trains from the start, the second from ``text_from_epoch``,
    #: the rest from ``trunk_from_epoch`` (misc/train/schedule.py)
    PARTS: tuple[str, ...] = ()
    #: whether a text's filter keeps only the k largest entries of its vector (DSVE's eq. 9)
    uses_k: bool = False
    #: whether the original release's networks (their trunk) can start this system
    starts_from_original_release: bool = False

    config: ModelConfig
    image: nn.Module
    text: nn.Module

    def forward(self, images: torch.Tensor, words: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(images), self.text(words, lengths)

    def score(self, images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def vector_dim(self) -> int:
        raise NotImplementedError

    @property
    def embeddable(self) -> bool:
        """Whether the score is the dot product of one vector per image and one per caption (retrieval from
        vectors, extraction, search)."""
        return True

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_maps(self.maps(images))

    def text_vectors(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_output(self, maps: torch.Tensor) -> torch.Tensor:
        """What :meth:`score` takes of an image, from its maps."""
        raise NotImplementedError

    def text_filters(self, words: torch.Tensor, lengths: torch.Tensor, k: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def phrase_filters(self, words: torch.Tensor, lengths: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """One filter per phrase read in its caption's context: ``spans`` (Q, 3) long rows (caption, first token,
        end token) into the captions ``words`` (B, T, word_dim) -> (Q, C). Only a system with a vector per word
        has one; the refusal is one line."""
        raise NotImplementedError(f"{type(self).__name__} has one text vector per sentence, not one per word: "
                                  f"phrase maps in a caption's context need a matchmap checkpoint")

    def heatmaps(self, images: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor,
                 k: int | None = None) -> torch.Tensor:
        """Each text's heatmap on each image: its filter applied at every position, (B, Q, h, w)."""
        return apply_filters(self.maps(images), self.text_filters(words, lengths, k))

    def parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    @staticmethod
    def config_dims(config: ModelConfig) -> list[tuple[str, str, int, int]]:
        """Where each dimension of ``config`` shows in the weights: (field, tensor, axis, the size ``config`` gives
        that axis), so that a weights file can be checked against a configuration from its header alone, before
        the network is built."""
        raise NotImplementedError
