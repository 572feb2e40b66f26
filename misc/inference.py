"""A trained model ready to use: its network, word vectors and image preprocessing, loaded from one checkpoint.

Every CLI that uses a trained model goes through :class:`Inference`::

    model = Inference.load("runs/demo/best.pth.tar", device="cpu")
    texts = model.embed_texts(["a red circle"])        # (T, d) unit rows, eq. 4
    maps = model.maps(model.transform()(image)[None])  # (1, D', h, w): the maps G of eq. 1, for eq. 8-9
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from misc import checkpoint
from misc.datasets import eval_transform
from misc.localization import choose_k
from misc.engine import autocast, encode_captions, image_vectors, resolve_device, vector_dim
from misc.words import WordVectors
from models.joint import JointEmbedding


@dataclass
class Inference:
    """A model in eval mode on ``device``, with the word vectors and text preprocessing it was trained with (read
    on first use, so that image-only work needs no word-vector file)."""

    model: JointEmbedding
    state: dict[str, Any]  # the checkpoint as loaded: "config", "model", ...
    checkpoint: Path
    device: torch.device
    amp: str | None = None  # mixed precision: "bf16" (CUDA or CPU), "fp16" (CUDA) or None
    words_path: Path | None = None  # overrides the word-vector file the checkpoint names

    @classmethod
    def load(cls, path: Path | str, words: Path | str | None = None, device: torch.device | str = "auto",
             amp: str | None = None) -> Inference:
        """Load a checkpoint (this project's or the original release's); ``words`` overrides the stored
        word-vector file; ``device`` is a torch device or ``auto``.

        ``amp="bf16"`` on the CPU runs the image path in bfloat16 autocast with channels-last tensors (oneDNN's
        fast layout); embeddings stay float32 and close to, not equal to, float32 inference.
        """
        device = resolve_device(device) if isinstance(device, str) else device
        autocast(device, amp)  # fp16 without CUDA fails here, before the checkpoint is read
        state = checkpoint.load(path)
        network = checkpoint.model_from(state, path, device)
        if amp is not None:
            network.image.to(memory_format=torch.channels_last)
        return cls(network, state, Path(path), device, amp, Path(words) if words else None)

    @cached_property
    def words(self) -> WordVectors:
        """The word vectors and text preprocessing of the checkpoint (eq. 4's frozen input)."""
        return checkpoint.load_words(self.state, self.words_path, self.checkpoint)

    @property
    def config(self) -> dict[str, Any]:
        """The checkpoint's configuration: {"model", "train", "word_vectors", ...}."""
        return self.state["config"]

    @property
    def dim(self) -> int:
        """The dimension of one image's or one text's vector: d for DSVE, the region dimension for the matchmap."""
        return vector_dim(self.model)

    @property
    def test_size(self) -> int:
        """The image side the checkpoint evaluates at (SIZE x SIZE)."""
        return int(self.config["train"]["test_size"])

    @property
    def weight(self) -> torch.Tensor:
        """A (d, D') of eq. 1, float32: the projection that eq. 8 applies at every position."""
        return self.model.image.proj.weight.detach().float()

    def transform(self, size: int | None = None, protocol: str = "resize") -> Callable:
        """The evaluation preprocessing of a PIL image (default size: :attr:`test_size`)."""
        return eval_transform(size or self.test_size, protocol)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on the device, channels-last under mixed precision (the layout of the image path then)."""
        layout = torch.channels_last if self.amp else torch.contiguous_format
        return images.to(self.device, memory_format=layout, non_blocking=True)

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps heatmaps are read from, (B, C, h, w) float32, of a batch of normalised images: DSVE's G
        (eq. 3), the matchmap's region vectors."""
        with autocast(self.device, self.amp):
            return self.model.maps(self._input(images)).float().contiguous()

    @torch.no_grad()
    def filters(self, texts: list[str], k: int | None = None) -> torch.Tensor:
        """One filter per text (T, C) on the device, applied to :meth:`maps` by
        :func:`misc.localization.apply_filters`: DSVE's eq. 9 filter of the k largest entries, the matchmap's mean
        word vector (its phrase map is the mean of its words' maps; ``k`` is not used)."""
        encoded = self.words.encode(texts)
        with autocast(self.device, self.amp):
            return self.model.text_filters(encoded.words.to(self.device), encoded.lengths, k).float()

    @torch.no_grad()
    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """One vector per image (B, :attr:`dim`) from its :meth:`maps`: DSVE's unit embedding (eq. 1-3), the
        matchmap's mean region vector."""
        if self.model.config.arch == "matchmap":
            return maps.mean(dim=(2, 3))
        return self.model.image.embed_maps(maps).float()

    def choose_k(self, requested: int | None, paper_k: int) -> int | None:
        """k of eq. 9 for a DSVE model (:func:`misc.localization.choose_k`); None for the matchmap, whose
        heatmaps use every dimension."""
        return None if self.model.config.arch == "matchmap" else choose_k(requested, self.dim, paper_k)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per image (B, :attr:`dim`) float32 on the CPU: DSVE's unit embedding (eq. 1), the matchmap's
        mean region vector."""
        with autocast(self.device, self.amp):
            return image_vectors(self.model, self._input(images)).float().cpu()

    def embed_texts(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Unit text embeddings (T, d) float32 on the device (eq. 4); every text must have a word."""
        return encode_captions(self.model, texts, self.words, self.device, batch_size=batch_size, amp=self.amp,
                               progress=progress).to(self.device)

    def known_words(self, text: str) -> int:
        """How many of the tokens the text path would embed are in the vocabulary."""
        return sum(self.words.index(token) is not None for token in self.words.tokens(text))
