"""The model's configuration: plain data that :func:`models.joint.build_model` turns into a network, stored in
every checkpoint. A value out of range or an unknown name is refused when the configuration is made (a preset,
``--set``, a checkpoint), with one line naming the key."""
from __future__ import annotations

from dataclasses import dataclass

from models.checks import UserError, check_choice, check_number

POOLINGS = ("weldon", "gap")
ARCHS = ("dsve", "matchmap")  # models.joint.JointEmbedding (this paper) | models.matchmap.Matchmap (Das et al. 2019)
SCORES = ("avg_both", "max_img", "max_text")  # models.matchmap.match_scores
TEXT_UNITS = ("words", "phrases")  # what one step of the text path reads (misc/data/words.py WordVectors.steps)
UNKNOWN_WORDS = ("zero", "random")  # a new run's vector for a word not in the table (WordVectors.draw_unknown)


@dataclass
class ModelConfig:
    """Network dimensions; defaults are the paper's (§3, §4.1). ``arch`` chooses the system: ``dsve`` reads the
    fields up to ``forget_bias``, ``matchmap`` (Das, Ghouse, Verma, Li 2019) reads ``trunk``, ``trunk_cut``,
    ``region_dim``, ``lstm_hidden``, ``score``, ``text_units`` and ``word_dim``; both read ``trunk_init`` and
    ``unknown_words``."""

    arch: str = "dsve"
    trunk: str = "resnet152"  # a torchvision classification network or timm:NAME (models.trunks.build_trunk)
    maps_dim: int = 2400  # D', channels of the maps G
    embed_dim: int = 2400  # d, joint space (also the SRU hidden size)
    pooling: str = "weldon"  # or "gap"
    weldon_k: float = 15  # a count, or a fraction of positions when < 1
    image_dropout: float = 0.5
    word_dim: int = 620
    sru_layers: int = 4
    text_dropout: float = 0.25  # sru's dropout: on the outputs of every SRU layer but the last
    rnn_dropout: float = 0.25  # sru's rnn_dropout: on every SRU layer's input, one mask per caption (the original's)
    forget_bias: float = 0.0  # initial SRU forget-gate bias; > 0 keeps early words in memory longer (paper: 0)
    # What a new model's trunk starts from (models.trunks.init_trunk): "scratch", a torchvision weights name
    # ("IMAGENET1K_V1", "IMAGENET1K_V2", ...: from torch hub's cache), "file:PATH" (a state dict of the whole network
    # in the trunk's keys), "package:NAME" (an installed weights package: models.trunks.PACKAGES) or
    # "checkpoint:PATH" (train.py --init); "" = not chosen yet. A checkpoint's weights supersede it.
    trunk_init: str = ""
    # the matchmap (models/matchmap.py): region vectors v[h, w] and word vectors w[t] of the same size D
    trunk_cut: str = ""  # the trunk's last stage kept: layer2-4 (ResNet) or conv3-5 (VGG); "" = its last conv stage
    region_dim: int = 1024  # D, channels of the 3x3 conv on the trunk's grid
    lstm_hidden: int = 1024  # hidden size of the one-layer LSTM: must equal region_dim
    score: str = "avg_both"  # caption-image score from the matchmap: avg_both | max_img | max_text
    # "phrases": each annotated phrase of a caption (Flickr30K Entities brackets, JSON-lines regions) is one step
    # of the LSTM, the mean of its words' vectors (Das et al.'s code, parse_mode "phrase"); other words one step each
    text_units: str = "words"
    # a word the table lacks: "zero" (its UNK row, else zeros) or "random" (drawn once per word from N(mean, std)
    # of the table, per dimension, seeded by train.seed, kept in the checkpoint: Das et al.'s vocabulary)
    unknown_words: str = "zero"

    def __post_init__(self) -> None:
        check_choice("model.arch", self.arch, ARCHS)
        check_choice("model.score", self.score, SCORES)
        check_choice("model.text_units", self.text_units, TEXT_UNITS)
        check_choice("model.unknown_words", self.unknown_words, UNKNOWN_WORDS)
        for key in ("maps_dim", "embed_dim", "word_dim", "sru_layers", "region_dim", "lstm_hidden"):
            check_number(f"model.{key}", getattr(self, key), low=1, whole=True)
        check_choice("model.pooling", self.pooling, POOLINGS)
        check_number("model.weldon_k", self.weldon_k, low=0, low_open=True)
        for key in ("image_dropout", "text_dropout", "rnn_dropout"):
            check_number(f"model.{key}", getattr(self, key), low=0, high=1, high_open=True)
        check_number("model.forget_bias", self.forget_bias)
        if self.arch == "dsve" and self.trunk_cut:
            raise UserError(f"model.trunk_cut = {self.trunk_cut!r}: the dsve trunk always ends at layer4; "
                            f"trunk_cut is for model.arch=matchmap")
        if self.arch == "dsve" and self.text_units != "words":
            raise UserError(f"model.text_units = {self.text_units!r}: the dsve text path reads words (eq. 4); "
                            f"phrase steps are for model.arch=matchmap")
        if self.arch == "matchmap" and self.lstm_hidden != self.region_dim:
            raise UserError(f"model.lstm_hidden = {self.lstm_hidden} but model.region_dim = {self.region_dim}: "
                            f"the matchmap is the dot product of word and region vectors, set both to one size")
