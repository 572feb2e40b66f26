"""The named settings of ``train.py --preset``: each a model and a training section over the defaults of
:class:`models.config.ModelConfig` and :class:`misc.config.TrainConfig`, and :func:`preset` to resolve one."""
from __future__ import annotations

from typing import Any

from misc.config import DATA, TrainConfig
from misc.errors import UserError
from models.config import ModelConfig

DAS2019_MODEL = {"arch": "matchmap", "trunk": "vgg19", "trunk_cut": "conv5", "region_dim": 1024, "lstm_hidden": 1024,
                 "word_dim": 300, "score": "avg_both"}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The original release's train.py as it ran (TrainConfig's defaults); the trunk source is chosen per run.
    "paper": {"model": {}, "train": {}},
    # The schedule as §4.1 states it: lr halved from epoch 2 to 6, the trunk fine-tuned from epoch 8.
    "paper-text": {"model": {}, "train": {"lr_halve_epochs": [2, 3, 4, 5, 6], "trunk_from_epoch": 8}},
    # Small enough to train on 2 CPU cores in about ten minutes from no pretrained weights at all: a random ResNet-18
    # whose conv1 and layer1 stay frozen (random low-level filters, no backward through the largest maps), 96x96
    # crops of the 128x128 images, no flip (the demo captions say left and right), a mild crop (they also say top
    # and corners), every caption of an image against one crop of it (a batch of 32 images is 160 pairs), an SRU
    # forget bias of 2 so that the caption's first words (colours, shapes) reach its last state, and two epochs of
    # the sum-over-negatives loss, which gets a randomly initialised model off the ground where hardest negatives
    # stall, before the paper's hardest negatives. Frozen layers keep fixed batch-norm statistics (eval mode) and
    # the SRU has no input dropout.
    "demo": {
        "model": {"trunk": "resnet18", "maps_dim": 256, "embed_dim": 256, "weldon_k": 0.2, "word_dim": 64,
                  "sru_layers": 2, "text_dropout": 0.1, "rnn_dropout": 0.0, "image_dropout": 0.2, "forget_bias": 2.0,
                  "trunk_init": "scratch"},
        "train": {"dataset": "demo", "split": "train", "epochs": 4, "batch_size": 32, "lr": 1e-3,
                  "lr_halve_epochs": [3], "text_from_epoch": 0, "trunk_from_epoch": 0,
                  "frozen_trunk": ["conv1", "bn1", "layer1"], "frozen_mode": "eval", "loss": "hard",
                  "sum_loss_epochs": 2,
                  "crop_size": 96, "crop_scale": [0.85, 1.0], "flip": False, "eval_size": 96, "test_size": 96,
                  "captions_per_image": 5, "group_captions": True, "workers": 1},
    },
    # The matchmap system on the demo world, in about three minutes on 2 CPU cores: a random ResNet-18 cut after
    # layer3 (a 6 x 6 grid of region vectors at 96 x 96, for pointing), 256-d regions and LSTM, the demo's 64-d
    # word vectors, the N-pair loss with Adam; data, crops and frozen layers as the demo preset.
    "demo-matchmap": {
        "model": {"arch": "matchmap", "trunk": "resnet18", "trunk_cut": "layer3", "region_dim": 256,
                  "lstm_hidden": 256, "word_dim": 64, "score": "avg_both", "trunk_init": "scratch"},
        "train": {"dataset": "demo", "split": "train", "epochs": 1, "batch_size": 32, "lr": 1e-3,
                  "lr_halve_epochs": [], "text_from_epoch": 0, "trunk_from_epoch": 0,
                  "frozen_trunk": ["conv1", "bn1", "layer1"], "frozen_mode": "eval", "loss": "npair",
                  "crop_size": 96, "crop_scale": [0.85, 1.0], "flip": False, "eval_size": 96, "test_size": 96,
                  "captions_per_image": 5, "group_captions": True, "workers": 1},
    },
    # The real-photo world of misc/data/photos.py (written to data/photos by `python photo_world.py data/photos`)
    # in a few minutes on 2 CPU cores, from the ImageNet EfficientNet-Lite0 package and GloVe 6B 50-d, both
    # offline: stem to stage4 stay frozen in eval mode (fixed batch statistics, no backward through the large
    # maps), the rest trains from the start at 128 x 128 (a 4 x 4 grid; localize at 256 or more), no flip
    # (captions say left and right), a mild crop, every caption of an image against one crop of it.
    "photos": {
        "model": {"trunk": "timm:efficientnet_lite0", "trunk_init": "package:efficientnet-lite0", "maps_dim": 512,
                  "embed_dim": 512, "weldon_k": 0.2, "word_dim": 50, "sru_layers": 1, "text_dropout": 0.1,
                  "rnn_dropout": 0.0, "image_dropout": 0.2, "forget_bias": 2.0},
        "train": {"dataset": str(DATA / "photos" / "photos.jsonl"), "words": "glove-6b-50d", "split": "train",
                  "epochs": 4, "batch_size": 32, "lr": 1e-3, "lr_halve_epochs": [2, 3], "text_from_epoch": 0,
                  "trunk_from_epoch": 0,
                  "frozen_trunk": ["stem", "stage1", "stage2", "stage3", "stage4"], "frozen_mode": "eval",
                  "loss": "hard", "sum_loss_epochs": 1, "crop_size": 128, "crop_scale": [0.85, 1.0], "flip": False,
                  "eval_size": 128, "test_size": 128, "captions_per_image": 5, "group_captions": True,
                  "workers": 1},
    },
    # Das, Ghouse, Verma, Li 2019 as the paper states it: VGG-19 conv5_4 regions (3x3 conv to 1024, BN, ReLU), an
    # LSTM (1024) over frozen GloVe-300 words (config key glove_vectors), N-pair loss, SGD (momentum 0.9), lr 1e-3 / 10
    # every 10 epochs, 64 pairs of whole images resized to 224 x 224 (no crop or flip, as their code); all parts train
    # from the start; trunk source per run. ResNet variant: model.trunk=resnet50, model.trunk_cut=layer3.
    "das2019": {"model": dict(DAS2019_MODEL), "train": {
        "epochs": 30, "batch_size": 64, "lr": 1e-3, "optimizer": "sgd", "momentum": 0.9, "lr_halve_epochs": [],
        "lr_decay_every": 10, "lr_decay": 0.1, "text_from_epoch": 0, "trunk_from_epoch": 0, "frozen_trunk": [],
        "loss": "npair", "margin": 0.1, "crop_size": 224, "resize_only": True, "flip": False, "eval_size": 224,
        "test_size": 224}},
    # Das et al.'s code (github deepandas11/LocNet) by default: main.py's flags (triplet, sampler hard, margin 0.1, SGD
    # lr 1e-3 momentum 0.9, 10 epochs, batch 64, flickr, parse_mode phrase, 224 x 224 resize), steps/utils.py
    # (custom_loss / batch size; lr / 10 at their epoch 10 counting from 1: our 9), steps/models_train.py (100
    # batches drawn with replacement), random unknown words (flickr_vocab_gen.py).
    "das2019-code": {"model": {**DAS2019_MODEL, "text_units": "phrases", "unknown_words": "random"}, "train": {
        "dataset": "flickr30k_entities", "split": "train", "val_split": "val", "epochs": 10, "batch_size": 64,
        "lr": 1e-3, "optimizer": "sgd", "momentum": 0.9, "lr_halve_epochs": [], "lr_decay_every": 10, "lr_decay": 0.1,
        "lr_decay_first": 9, "text_from_epoch": 0, "trunk_from_epoch": 0, "frozen_trunk": [], "loss": "hard",
        "margin": 0.1, "loss_reduction": "mean", "steps_per_epoch": 100, "crop_size": 224, "resize_only": True,
        "flip": False, "eval_size": 224, "test_size": 224}},
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configuration of the preset ``name`` (one line naming the presets otherwise)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = PRESETS[name]
    return ModelConfig(**values["model"]), TrainConfig(**values["train"])
