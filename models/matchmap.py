"""The second system (Das, Ghouse, Verma, Li 2019, arXiv 1908.02950): a grid of region vectors and a sequence of
word vectors in one space, compared by their matchmap.

    v[h, w] = ReLU(BN(conv3x3(CNN(image))))[:, h, w]    region vectors (D,), the CNN without its last pooling
    w[t]    = LSTM(glove(word_1), ..., glove(word_T))[t]  word vectors (D,), frozen word embeddings as input
    M[t, h, w] = <w[t], v[h, w]>                         the matchmap of a caption and an image

The caption-image score pools the matchmap (:func:`match_scores`): ``avg_both`` the mean over words of the mean
over regions, ``max_img`` the mean over words of the max over regions, ``max_text`` the mean over regions of the
max over words. Localization: a word's heatmap is M[t], a phrase's the mean of its words' maps; as M is linear in
w, that is the map of the phrase's mean word vector, a "filter" applied at every position as DSVE's eq. 9 filter
is (models/heatmaps.py), so both systems share the interface of models/system.py. Das et al. read a phrase in its
caption: the LSTM runs over the whole caption and the phrase's filter is the mean of w[t] over its tokens
(:meth:`Matchmap.phrase_filters`); ``text_filters`` reads the phrase's words alone.
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.system import System
from models.trunks import build_trunk, init_trunk


def word_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) bool: True at the real tokens of captions of ``lengths`` (B,) padded to ``steps``."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def matchmaps(regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """M[t, h, w] = <w[t], v[h, w]> of every image with every caption: regions (Bi, D, h, w), words (Bt, T, D)
    -> (Bi, Bt, T, h, w)."""
    return torch.einsum("ichw,jtc->ijthw", regions, words)


def match_scores(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor,
                 kind: str = "avg_both") -> torch.Tensor:
    """Score of every image with every caption, pooled from their matchmaps over real tokens only:
    regions (Bi, D, h, w), words (Bt, T, D), lengths (Bt,) -> (Bi, Bt).

    - ``avg_both``: mean_t mean_hw M[t, h, w], computed as <mean_t w[t], mean_hw v[h, w]> (M is bilinear);
    - ``max_img``: mean_t max_hw M[t, h, w];
    - ``max_text``: mean_hw max_t M[t, h, w].
    """
    mask = word_mask(lengths.to(words.device), words.shape[1])  # (Bt, T)
    if kind == "avg_both":
        return regions.mean(dim=(2, 3)) @ masked_mean(words, lengths).t()
    flat = matchmaps(regions, words).flatten(3)  # (Bi, Bt, T, hw)
    if kind == "max_img":
        best = flat.amax(dim=3).masked_fill(~mask, 0)  # (Bi, Bt, T)
        return best.sum(dim=2) / lengths.to(best.device)
    if kind == "max_text":
        return flat.masked_fill(~mask[None, :, :, None], float("-inf")).amax(dim=2).mean(dim=2)
    raise ValueError(f"unknown matchmap score {kind!r}")


def masked_mean(words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each caption's real word vectors: words (B, T, D), lengths (B,) -> (B, D)."""
    mask = word_mask(lengths.to(words.device), words.shape[1])
    return (words * mask[..., None]).sum(dim=1) / lengths.to(words.device)[:, None]


class RegionEncoder(nn.Module):
    """v[h, w]: the trunk's feature grid, then a 3x3 conv to D channels, batch norm and ReLU."""

    def __init__(self, trunk: str, cut: str, region_dim: int) -> None:
        super().__init__()
        self.trunk_name = trunk
        self.grid = build_trunk(trunk, cut)  # the trunk with its channels, stride and stages
        self.trunk = self.grid.module
        self.head = nn.Sequential(nn.Conv2d(self.grid.channels, region_dim, kernel_size=3, padding=1),
                                  nn.BatchNorm2d(region_dim), nn.ReLU(inplace=True))

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Region vectors: (B, 3, H, W) -> (B, D, h, w), e.g. 14 x 14 at 224 x 224 for VGG-19 conv5_4."""
        return self.head(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(images)

    def init_trunk(self, source: str) -> str:
        """Start the trunk from ``source`` (:func:`models.trunks.init_trunk`); returns what was done."""
        return init_trunk(self.grid, self.trunk_name, source)


class WordEncoder(nn.Module):
    """w[t]: a one-layer LSTM over frozen word vectors; outputs after a caption's end are zero."""

    def __init__(self, word_dim: int, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(word_dim, hidden, num_layers=1, batch_first=True)

    def forward(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """words (B, T, word_dim) right-padded, lengths (B,) >= 1 -> (B, T, D). The LSTM runs forward, so the
        outputs at real tokens never see the padding."""
        if bool((lengths < 1).any()):
            raise ValueError("every caption needs at least one token")
        outputs, _ = self.rnn(words)
        return outputs * word_mask(lengths.to(words.device), words.shape[1])[..., None]


class Matchmap(System):
    """The whole second system: ``image`` and ``text`` parts, the batch score matrix and the heatmaps."""

    PARTS = ("3x3 conv", "LSTM", "trunk")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image = RegionEncoder(config.trunk, config.trunk_cut, config.region_dim)
        self.text = WordEncoder(config.word_dim, config.lstm_hidden)

    def forward(self, images: torch.Tensor, words: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Regions (B, D, h, w) and word vectors (B', T, D)."""
        return self.image(images), self.text(words, lengths)

    def score(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Score matrix (Bi, Bt) of :func:`match_scores` with ``config.score``."""
        return match_scores(regions, words, lengths, self.config.score)

    @property
    def vector_dim(self) -> int:
        return self.config.region_dim

    @property
    def embeddable(self) -> bool:
        """``avg_both`` is <mean_t w[t], mean_hw v[h, w]> (M is bilinear): one vector per side; ``max_img`` and
        ``max_text`` pool with a max, so an image or a caption has no vector of its own."""
        return self.config.score == "avg_both"

    def text_vectors(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The mean word vector mean_t w[t] over each caption's real tokens (B, D)."""
        return masked_mean(self.text(words, lengths), lengths)

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps heatmaps are read from: the region vectors (B, D, h, w)."""
        return self.image.feature_maps(images)

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """The mean region vector mean_hw v[h, w] (B, D)."""
        return maps.mean(dim=(2, 3))

    def image_output(self, maps: torch.Tensor) -> torch.Tensor:
        return maps

    def text_filters(self, words: torch.Tensor, lengths: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """One filter per text (Q, D): the mean of its word vectors, whose map is the mean of its words' maps
        M[t]. ``k`` (DSVE's eq. 9) has no meaning here."""
        return masked_mean(self.text(words, lengths), lengths)

    def phrase_filters(self, words: torch.Tensor, lengths: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """A phrase's filter in its caption's context (Das et al.'s maps): the LSTM runs over the whole caption
        and the phrase's filter is the mean of the outputs w[t] at its tokens, so its map is the mean of those
        words' maps M[t]. ``spans`` (Q, 3) long: caption row, first token, end token (exclusive) -> (Q, D)."""
        spans = spans.to(words.device)
        rows, first, end = spans.unbind(dim=1)
        if bool((first < 0).any() | (end <= first).any() | (end > lengths.to(words.device)[rows]).any()):
            raise ValueError("every span needs 0 <= first < end <= its caption's length")
        outputs = self.text(words, lengths)[rows]  # (Q, T, D): each phrase's caption, read whole
        steps = torch.arange(outputs.shape[1], device=words.device)[None, :]
        inside = (steps >= first[:, None]) & (steps < end[:, None])  # (Q, T)
        return (outputs * inside[..., None]).sum(dim=1) / (end - first)[:, None].to(outputs.dtype)

    def parts(self) -> dict[str, nn.Module]:
        return {"3x3 conv": self.image.head, "LSTM": self.text, "trunk": self.image.trunk}

    @staticmethod
    def config_dims(config: ModelConfig) -> list[tuple[str, str, int, int]]:
        return [("region_dim", "image.head.0.weight", 0, config.region_dim),
                ("lstm_hidden", "text.rnn.weight_hh_l0", 1, config.lstm_hidden),
                ("word_dim", "text.rnn.weight_ih_l0", 1, config.word_dim)]
