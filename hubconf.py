"""torch.hub entry: a trained model for notebooks, the same object every command uses (misc.inference.Inference).

    import torch
    model = torch.hub.load("path/to/dsve-loc", "dsve", source="local", checkpoint="runs/demo/best.pth.tar")
    model.embed_images(["photo.jpg"])            # (N, d) image vectors (paths or PIL images)
    model.embed_texts(["a red circle"])          # (T, d) text vectors (eq. 4)
    model.heatmaps("photo.jpg", ["a red circle"])  # eq. 9 maps, peaks in the image's pixels, scores, unknown words
    model.plot("photo.jpg", ["a red circle"], out="map.png")  # the figure (paper Fig. 1)

One entry serves both systems: a checkpoint carries its configuration (model.arch: DSVE or the matchmap), and
:class:`~misc.inference.Inference` offers the same methods for either, so a second entry would only repeat the
first. Nothing is downloaded: the checkpoint and the word vectors it names are local files.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names imported here would show as entries in torch.hub.list (every public callable is one)
    from pathlib import Path

    from misc.inference import Inference

# torch.hub checks these before calling an entry; the project's modules are imported by the entry itself, so that
# a missing package is named by torch.hub rather than met as an ImportError
dependencies = ["torch", "torchvision", "sru", "gensim", "nltk", "matplotlib", "PIL"]


def dsve(checkpoint: str | Path, words: str | Path | None = None, device: str = "auto",
         amp: str | None = None) -> Inference:
    """A trained model of either system from ``checkpoint`` (this project's or the original release's), ready to
    embed images and texts and to localize texts: :class:`misc.inference.Inference`. ``words`` overrides the
    word-vector file the checkpoint names; ``device``: auto, cpu, cuda or cuda:N; ``amp``: None, bf16 or fp16."""
    from misc.inference import Inference

    return Inference.load(checkpoint, words, device, amp)
