"""A trained model ready to use: its network, word vectors and image preprocessing, loaded from one checkpoint.

Every CLI, the web app and torch.hub (hubconf.py) use a trained model through :class:`Inference`::

    model = Inference.load("runs/demo/best.pth.tar", device="cpu")
    images = model.embed_images(["photo.jpg", pil_image])      # (N, d) unit rows, eq. 1-3
    texts = model.embed_texts(["a red circle"])                # (T, d) unit rows, eq. 4
    found = model.heatmaps("photo.jpg", ["a red circle"])      # eq. 9 maps, peaks, scores, unknown words
    found = model.heatmaps("photo.jpg", ["dog"], caption="a dog on grass")  # matchmap: the phrase in context
    model.plot("photo.jpg", ["a red circle"], out="map.png")   # the figure (paper Fig. 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure
from PIL import Image

from misc.store import checkpoint
from misc.data.datasets import eval_transform
from misc.errors import UserError
from misc.data.images import oriented, read_image
from misc.data.jsonl import with_regions
from misc.eval.localization import POINTING_K, choose_k, localization_side, peak_location
from misc.devices import autocast, resolve_device
from misc.eval.encode import encode_captions
from misc.visualize import DEFAULT_COLORMAP, overlays, panel_size, panel_title, save_png
from misc.data.spans import find_tokens, step_span
from misc.data.words import WordVectors
from models.heatmaps import apply_filters
from models.joint import Model

ImageSource = str | Path | Image.Image


def as_image(source: ImageSource, size: int | None = None) -> Image.Image:
    """A PIL image, EXIF orientation applied, RGB, of a PIL image or of a path (:func:`misc.data.images.read_image`:
    a JPEG at the reduced scale ``size`` x ``size`` allows, as image extraction decodes it)."""
    return oriented(source) if isinstance(source, Image.Image) else read_image(source, size)


@dataclass
class Heatmaps:
    """Where each text is in one image (eq. 9), from :meth:`Inference.heatmaps`."""

    texts: list[str]
    maps: torch.Tensor  # (T, h, w) float32 on the CPU: the filter of each text at every position (eq. 9)
    peaks: torch.Tensor  # (T, 2) x, y of each map's largest cell centre in the pixels of ``image``
    scores: torch.Tensor  # (T,) the image-text score: DSVE's cosine (eq. 3, 4), the matchmap's pooled score
    unknown: list[list[str]]  # each text's words that are not in the vocabulary (they are embedded as unknown)
    image: Image.Image  # the image as the model saw it before resizing: EXIF-oriented, RGB
    size: int  # the image was resized to size x size for the maps
    k: int | None  # eq. 9's k (None for the matchmap)

    def titles(self) -> list[str]:
        """Each panel's title: the text, its score and its unknown words."""
        width = panel_size(*self.image.size)[0]
        return [panel_title(text, float(score), unknown, width)
                for text, score, unknown in zip(self.texts, self.scores, self.unknown)]

    def figure(self, shared_scale: bool = False, boxes: Sequence[Sequence[Sequence[float]]] | None = None,
               alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP) -> Figure:
        """The matplotlib figure of :func:`misc.visualize.overlays`; ``boxes``: per text, boxes (x, y, w, h) in
        the image's pixels to draw."""
        return overlays(self.image, self.maps, self.peaks, self.titles(), boxes, shared_scale, alpha, colormap)


@dataclass
class Inference:
    """A model in eval mode on ``device``, with the word vectors and text preprocessing it was trained with (read
    on first use, so that image-only work needs no word-vector file)."""

    model: Model  # either system (models/system.py)
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
        return self.model.vector_dim

    @property
    def test_size(self) -> int:
        """The image side the checkpoint evaluates at (SIZE x SIZE)."""
        return int(self.config["train"]["test_size"])

    @property
    def localization_size(self) -> int:
        """The image side heatmaps are made at unless told (:func:`misc.eval.localization.localization_side`)."""
        return localization_side(self.test_size, self.model.image.grid.stride)

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
        :func:`models.heatmaps.apply_filters`: DSVE's eq. 9 filter of the k largest entries, the matchmap's mean
        word vector (its phrase map is the mean of its words' maps; ``k`` is not used)."""
        encoded = self.words.encode(texts)
        with autocast(self.device, self.amp):
            return self.model.text_filters(encoded.words.to(self.device), encoded.lengths, k).float()

    @torch.no_grad()
    def filters_in_context(self, captions: list[str], spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """One filter per phrase read in its caption's context (T, C) on the device: ``spans`` are (caption index,
        first token, end token) into the tokens of ``captions`` (``words.tokens``); the matchmap's mean of the
        in-context word vectors over the span (``model.phrase_filters``); under ``model.text_units: phrases`` the
        steps holding those tokens (a caption's annotated phrase is one step). DSVE refuses in one line."""
        encoded = self.words.encode(captions)
        steps = [(row, *step_span(encoded.steps[row], first, end)) for row, first, end in spans]
        rows = torch.tensor(steps, dtype=torch.long).reshape(-1, 3)
        try:
            with autocast(self.device, self.amp):
                return self.model.phrase_filters(encoded.words.to(self.device), encoded.lengths, rows).float()
        except NotImplementedError as refusal:
            raise UserError(str(refusal)) from None

    def spans_in(self, caption: str, phrases: list[str]) -> list[tuple[int, int, int]]:
        """(0, first token, end token) of each phrase's first occurrence among ``caption``'s tokens; a phrase
        that is not in the caption is a one-line error."""
        tokens = self.words.tokens(caption)
        spans = []
        for phrase in phrases:
            found = find_tokens(tokens, self.words.tokens(phrase))
            if found is None:
                raise UserError(f"phrase {phrase!r} is not in the caption {caption!r}: give words of the caption")
            spans.append((0, *found))
        return spans

    @torch.no_grad()
    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """One vector per image (B, :attr:`dim`) from its :meth:`maps`: DSVE's unit embedding (eq. 1-3), the
        matchmap's mean region vector."""
        return self.model.embed_maps(maps).float()

    def choose_k(self, requested: int | None, paper_k: int) -> int | None:
        """k of eq. 9 for a DSVE model (:func:`misc.eval.localization.choose_k`); None for the matchmap, whose
        heatmaps use every dimension."""
        return choose_k(requested, self.dim, paper_k) if self.model.uses_k else None

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor | Sequence[ImageSource], size: int | None = None,
                     batch_size: int = 32) -> torch.Tensor:
        """One vector per image (N, :attr:`dim`) float32 on the CPU: DSVE's unit embedding (eq. 1-3), the
        matchmap's mean region vector. ``images``: a normalised batch (N, 3, H, W), or paths and PIL images,
        decoded as every command decodes a user's photo (EXIF orientation applied) and resized to ``size`` x
        ``size`` (default :attr:`test_size`), in batches of ``batch_size``."""
        if isinstance(images, torch.Tensor):
            with autocast(self.device, self.amp):
                return self.model.image_vectors(self._input(images)).float().cpu()
        size = size or self.test_size
        transform = self.transform(size)
        vectors = [self.embed_images(torch.stack([transform(as_image(source, size))
                                                  for source in images[start:start + batch_size]]))
                   for start in range(0, len(images), batch_size)]
        return torch.cat(vectors) if vectors else torch.empty(0, self.dim)

    def embed_texts(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Unit text embeddings (T, d) float32 on the CPU, as :meth:`embed_images` (eq. 4); every text must have a
        word."""
        return encode_captions(self.model, texts, self.words, self.device, batch_size=batch_size, amp=self.amp,
                               progress=progress)

    def known_words(self, text: str) -> int:
        """How many of the tokens the text path would embed are in the vocabulary."""
        return sum(self.words.index(token) is not None for token in self.words.tokens(text))

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` (tokens with a letter or digit) that are not in the vocabulary, those given a drawn
        vector (``model.unknown_words: random``) included."""
        drawn = set(self.words.added)
        return [token for token in self.words.tokens(text) if any(c.isalnum() for c in token)
                and (self.words.index(token) is None or self.words.key(token) in drawn)]

    @torch.no_grad()
    def scores(self, image: Image.Image, texts: list[str]) -> torch.Tensor:
        """(T,) the model's image-text score at :attr:`test_size`, as retrieval ranks: DSVE's cosine of the unit
        embeddings (eq. 3, 4), the matchmap's pooled matchmap (``model.score``)."""
        maps = self.maps(self.transform()(image)[None])
        encoded = self.words.encode(texts)
        lengths = encoded.lengths.to(self.device)
        with autocast(self.device, self.amp):
            text_out = self.model.text(encoded.words.to(self.device), lengths).float()
        return self.model.score(self.model.image_output(maps), text_out, lengths)[0].float().cpu()

    def heatmaps(self, image: ImageSource, texts: str | list[str], size: int | None = None,
                 k: int | None = None, caption: str | None = None, per_word: bool = False) -> Heatmaps:
        """Each text's heatmap on the image (eq. 9) with its peak in the image's pixels, its score and its
        unknown words. The image (path or PIL) is resized to ``size`` x ``size`` (default
        :attr:`localization_size`: the paper's 416 for its model); ``k`` of eq. 9 defaults to the
        paper's 180 for d = 2400, scaled to this model's d (:meth:`choose_k`). With ``caption`` (matchmap only)
        each text is a phrase of the caption read in its context (:meth:`filters_in_context`) and scored as the
        caption; with ``per_word`` too, ``texts`` is ignored and every word token of the caption has its map."""
        if per_word:
            if caption is None:
                raise UserError("one map per word needs the caption (--caption)")
            tokens = self.words.tokens(caption)
            positions = [t for t, token in enumerate(tokens) if any(c.isalnum() for c in token)]
            texts, spans = [tokens[t] for t in positions], [(0, t, t + 1) for t in positions]
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise UserError("no text to localize: give at least one")
        for text in texts:
            if not any(any(c.isalnum() for c in token) for token in self.words.tokens(text)):
                raise UserError(f"query {text!r} has no words")
        picture, size = as_image(image), size or self.localization_size
        k = self.choose_k(k, POINTING_K)
        if caption is None:
            filters, scores = self.filters(texts, k), self.scores(picture, texts)
        else:
            # a phrase given with its caption is one step under model.text_units: phrases, as in training
            caption = caption if per_word else with_regions(caption, texts)
            filters = self.filters_in_context([caption], spans if per_word else self.spans_in(caption, texts))
            scores = self.scores(picture, [caption]).expand(len(texts))
        maps = self.maps(self.transform(size)(picture)[None])  # (1, C, h, w)
        heat = apply_filters(maps, filters)[0].cpu()  # (T, h, w)
        return Heatmaps(texts, heat, peak_location(heat, *picture.size), scores,
                        [self.unknown_words(text) for text in texts], picture, size, k)

    def plot(self, image: ImageSource, texts: str | list[str], out: Path | str | None = None, size: int | None = None,
             shared_scale: bool = False, boxes: Sequence[Sequence[Sequence[float]]] | None = None,
             k: int | None = None) -> Figure:
        """The figure of :meth:`heatmaps` (paper Fig. 1): one panel per text with a colour bar, its score and
        unknown words in the title; ``shared_scale`` gives every panel one colour scale; ``boxes`` per text (x, y,
        w, h in the image's pixels) are drawn. With ``out`` the figure is also written there as a PNG,
        atomically."""
        figure = self.heatmaps(image, texts, size, k).figure(shared_scale, boxes)
        if out is not None:
            save_png(figure, out)
        return figure
