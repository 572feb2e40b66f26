"""Paths and settings resolve with clear errors."""
from __future__ import annotations

import pytest

from misc import config
from misc.config import ConfigError


def test_missing_path_names_key_env_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("DSVE_COCO_KARPATHY", str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError) as error:
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


def test_settings_parse_json_values_and_reject_unknown_keys():
    model, train = config.preset("demo")
    model, train = config.apply_settings(model, train, ["model.embed_dim=32", "train.lr_halve_epochs=[1,2]",
                                                        "model.trunk=resnet34"])
    assert model.embed_dim == 32 and train.lr_halve_epochs == [1, 2] and model.trunk == "resnet34"
    for bad in ["model.nope=1", "embed_dim=3", "loss.x=1"]:
        with pytest.raises(ConfigError, match="--set"):
            config.apply_settings(model, train, [bad])
    with pytest.raises(ConfigError, match="unknown preset"):
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
