"""Paths and settings resolve with clear errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from misc import config
from misc.config import TrainConfig
from misc.errors import UserError
from models.config import ModelConfig
from tests.conftest import ROOT

# Prints where misc.config puts the data root, two keys under it, the demo world and the runs.
ROOTS = ("from misc import config; print(config.DATA, config.path('coco_karpathy', must_exist=False), "
         "config.path('vg_dir', must_exist=False), config.DEMO_DIR, config.RUNS, sep='\\n')")


def roots(where: Path, path: Path, **variables: str) -> list[Path]:
    """misc.config's paths in a fresh interpreter run in ``where`` with ``path`` first on sys.path."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DSVE_")}
    result = subprocess.run([sys.executable, "-c", ROOTS], cwd=where, capture_output=True, text=True, timeout=120,
                            env={**environment, "PYTHONPATH": str(path), **variables})
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.splitlines()]


def test_the_data_root_is_the_clones_or_dsve_data_and_a_key_variable_still_wins(tmp_path):
    assert roots(tmp_path, ROOT) == [ROOT / "data", ROOT / "data/coco/dataset_coco.json", ROOT / "data/vg",
                                     ROOT / "data/demo", ROOT / "runs"]
    mine = tmp_path / "mine"
    assert roots(tmp_path, ROOT, DSVE_DATA=str(mine), DSVE_VG_DIR=str(tmp_path / "vg")) == [
        mine, mine / "coco/dataset_coco.json", tmp_path / "vg", mine / "demo", ROOT / "runs"]


def test_installed_the_data_root_is_the_working_directorys(tmp_path):
    site = tmp_path / "site-packages"  # the packages as pip lays them out: no pyproject.toml beside them
    for package in ("misc", "models"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    assert roots(work, site) == [work / "data", work / "data/coco/dataset_coco.json", work / "data/vg",
                                 work / "data/demo", work / "runs"]


def test_missing_path_names_key_env_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("DSVE_COCO_KARPATHY", str(tmp_path / "nope.json"))
    with pytest.raises(UserError) as error:
        config.path("coco_karpathy")
    message = str(error.value)
    assert "coco_karpathy" in message and "DSVE_COCO_KARPATHY" in message and "nope.json" in message
    assert "\n" not in message


def test_environment_overrides_default_but_not_demo(monkeypatch, tmp_path):
    target = tmp_path / "dataset_coco.json"
    target.write_text("{}")
    monkeypatch.setenv("DSVE_COCO_KARPATHY", str(target))
    assert config.path("coco_karpathy") == target
    assert config.path("coco_karpathy", demo=True, must_exist=False) == config.DEMO_DIR / "dataset_coco.json"


def test_default_word_vectors_are_glove_for_the_matchmap_outside_the_demo_world():
    das_model, das_train = config.preset("das2019")
    key = config.default_words_key(das_model.arch, das_train.dataset == "demo")
    assert key == "glove_vectors" and "300-d" in config.PATHS[key].what and das_model.word_dim == 300
    demo_model, demo_train = config.preset("demo-matchmap")  # the demo world's own vectors, as for DSVE
    assert config.default_words_key(demo_model.arch, demo_train.dataset == "demo") == "word_vectors"
    paper_model, paper_train = config.preset("paper")
    assert config.default_words_key(paper_model.arch, paper_train.dataset == "demo") == "word_vectors"


def test_settings_parse_json_values_and_reject_unknown_keys():
    model, train = config.preset("demo")
    model, train = config.apply_settings(model, train, ["model.embed_dim=32", "train.lr_halve_epochs=[1,2]",
                                                        "model.trunk=resnet34"])
    assert model.embed_dim == 32 and train.lr_halve_epochs == [1, 2] and model.trunk == "resnet34"
    for bad in ["model.nope=1", "embed_dim=3", "loss.x=1"]:
        with pytest.raises(UserError, match="--set"):
            config.apply_settings(model, train, [bad])
    with pytest.raises(UserError, match="unknown preset"):
        config.preset("huge")


def test_presets_differ_where_documented():
    from dataclasses import asdict
    paper_model, paper = config.preset("paper")
    text_model, text = config.preset("paper-text")
    assert paper_model == text_model
    assert {k for k, v in asdict(paper).items() if asdict(text)[k] != v} == {"lr_halve_epochs", "trunk_from_epoch"}
    assert paper_model.trunk_init == "" and paper.frozen_mode == "train" and paper_model.rnn_dropout == 0.25
    demo_model, demo = config.preset("demo")
    assert demo_model.trunk_init == "scratch" and demo.frozen_mode == "eval" and demo_model.rnn_dropout == 0.0


@pytest.mark.parametrize("setting, value", [("train.lr=5e-4", 5e-4), ("train.lr=1", 1.0), ("train.epochs=3", 3),
                                            ("train.flip=false", False), ("train.grad_clip=null", None),
                                            ("train.grad_clip=2", 2.0), ("train.crop_scale=[0.5, 1]", [0.5, 1]),
                                            ("train.dataset=captions.jsonl", "captions.jsonl"),
                                            ("model.weldon_k=0.2", 0.2)])
def test_set_values_are_typed_from_the_fields(setting, value):
    model, train = config.apply_settings(*config.preset("demo"), [setting])
    section, key = setting.split("=")[0].split(".")
    got = getattr(model if section == "model" else train, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("setting, message", [
    ("train.epochs=2.5", "--set train.epochs=2.5: expected a whole number"),
    ("train.epochs=many", "--set train.epochs=many: expected a whole number"),
    ("train.flip=1", "expected true or false"),
    ("train.lr_halve_epochs=3", "expected a JSON list of a whole number"),
    ("train.lr=-1e-3", r"train.lr = -0.001: must lie in \(0, inf\]"),
    ("train.batch_size=0", r"train.batch_size = 0: must lie in \[1, inf\]"),
    ("train.epochs=-2", r"train.epochs = -2: must lie in \[1, inf\]"),
    ("model.image_dropout=1", r"model.image_dropout = 1.0: must lie in \[0, 1\)"),
    ("train.loss=hardest", r"train.loss = 'hardest': unknown \(did you mean hard\?\)"),
    ("model.pooling=wledon", r"did you mean weldon\?"),
    ("train.learning_rate=1", r"--set train.learning_rate=1: expected model.KEY=VALUE or train.KEY=VALUE"),
    ("train.btach_size=8", r"did you mean train.batch_size\?"),
])
def test_bad_settings_are_one_line_naming_the_key(setting, message):
    with pytest.raises(UserError, match=message) as error:
        config.apply_settings(*config.preset("demo"), [setting])
    assert "\n" not in str(error.value)


def test_a_checkpoint_config_with_an_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(UserError, match=r"unknown keys \['embed_dims'\] \(did you mean embed_dim\?\)"):
        config.from_dict(config.ModelConfig, {"embed_dims": 8})


def test_settings_that_must_agree_can_change_together():
    model, _ = config.apply_settings(*config.preset("demo-matchmap"),
                                     ["model.region_dim=16", "model.lstm_hidden=16"])
    assert (model.region_dim, model.lstm_hidden) == (16, 16)
    with pytest.raises(UserError, match="lstm_hidden"):
        config.apply_settings(*config.preset("demo-matchmap"), ["model.region_dim=16"])


def test_the_paper_preset_resolves_to_the_papers_and_the_original_codes_values():
    """Every field of preset "paper", typed here from their sources: the paper (Engilberge et al., CVPR 2018, §3 and
    §4.1), the original release's train.py where the code and the text differ (its schedule runs one epoch later
    than §4.1 states; see misc/train/schedule.py), and this project's own choices for fields neither names."""
    from dataclasses import fields

    model, train = config.preset("paper")
    expected_model = {
        "arch": "dsve",  # the paper's system (the matchmap is Das et al. 2019's)
        "trunk": "resnet152",  # §4.1: ResNet-152
        "maps_dim": 2400,  # §3: D' = 2400 channels of the 1x1 conv's maps G
        "embed_dim": 2400,  # §3: d = 2400, the joint space and the SRU's hidden size
        "pooling": "weldon",  # §3: WELDON spatial pooling
        "weldon_k": 15,  # original train.py: WELDON pooling with k = 15
        "image_dropout": 0.5,  # original code: image-pipeline dropout 0.5
        "word_dim": 620,  # §3: 620-d skip-thought word embeddings
        "sru_layers": 4,  # §3: 4 stacked SRU layers
        "text_dropout": 0.25,  # original code: SRU dropout 0.25
        "rnn_dropout": 0.25,  # original code: SRU rnn_dropout 0.25
        "forget_bias": 0.0,  # §3: no forget-gate bias added (models/config.py: "paper: 0")
        "trunk_init": "",  # this project: the trunk's weights are chosen per run (ImageNet in §4.1)
        "trunk_cut": "",  # matchmap only (unused by dsve)
        "region_dim": 1024,  # matchmap only: Das et al. 2019's D
        "lstm_hidden": 1024,  # matchmap only: equals region_dim
        "score": "avg_both",  # matchmap only
        "text_units": "words",  # eq. 4: one SRU step per word (phrase steps are Das et al.'s code's, matchmap only)
        "unknown_words": "zero",  # original code: an unknown word reads the table's UNK row
    }
    expected_train = {
        "dataset": "coco",  # §4.1: MS-COCO
        "split": "trainrv",  # §4.1: Karpathy's train + restval (113k images)
        "val_split": "val",  # Karpathy's 5k validation images
        "words": "",  # this project: the configured key's vectors (skip-thought's in the paper)
        "epochs": 20,  # this project's run length (not in the sources above); the schedule ends changing at 9
        "batch_size": 160,  # §4.1: batches of 160 pairs
        "lr": 1e-3,  # §4.1: Adam, learning rate 0.001
        "lr_halve_epochs": [3, 4, 5, 6, 7],  # original train.py (epochs from 0; §4.1 states 2 to 6)
        "text_from_epoch": 2,  # original train.py: the SRU joins the optimizer after epoch 1
        "trunk_from_epoch": 9,  # original train.py: the trunk joins after epoch 8 (§4.1 states 8)
        "frozen_trunk": ["conv1", "bn1", "layer1", "layer2"],  # original train.py: these stay frozen
        "frozen_mode": "train",  # original code: the frozen parts stay in train mode
        "margin": 0.2,  # §3, eq. 7: margin alpha = 0.2
        "loss": "hard",  # §3, eq. 7: the hardest negatives
        "sum_loss_epochs": 0,  # §3: no warm-up with eq. 5
        "grad_clip": None,  # the paper clips no gradient
        "skip_nonfinite": 0,  # this project: a non-finite step stops the run at once
        "optimizer": "adam",  # §4.1: Adam
        "momentum": 0.9,  # sgd only (unused by Adam)
        "lr_decay_every": 0,  # the halving schedule, not a step decay
        "lr_decay": 0.1,  # step decay only (unused)
        "crop_size": 256,  # original code: random crops of 256 x 256
        "crop_scale": [0.08, 1.0],  # original code: RandomResizedCrop's scale range
        "flip": True,  # original code: random horizontal flips
        "eval_size": 350,  # original train.py: validation images at 350 x 350
        "test_size": 400,  # original evaluation: images resized to 400 x 400
        "captions_per_image": 5,  # COCO's 5 captions, every one a pair each epoch
        "group_captions": False,  # original code: independent pairs
        "workers": 4,  # this project's loader default
        "seed": 0,  # this project's default seed
        "resize_only": False,  # original code: random resized crops, not a plain resize (Das et al.'s option)
        "steps_per_epoch": 0,  # original code: an epoch is a full pass over the pairs
        "loss_reduction": "sum",  # eq. 7 summed over the batch, as the original code sums it
        "lr_decay_first": 0,  # step decay only (unused by the halving schedule)
        "allow_test_overlap": False,  # this project: a run never trains on its evaluation images unasked
    }
    assert {f.name for f in fields(ModelConfig)} == set(expected_model)  # a new field must be pinned here too
    assert {f.name for f in fields(TrainConfig)} == set(expected_train)
    for name, value in expected_model.items():
        assert (name, getattr(model, name)) == (name, value)
    for name, value in expected_train.items():
        assert (name, getattr(train, name)) == (name, value)
