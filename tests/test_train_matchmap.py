"""Training and validation retrieval through the score matrix: DSVE's loss unchanged, the matchmap system trained
by train.py on the tiny demo world, its retrieval from vectors (avg_both) or from the whole score matrix."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from misc.store import checkpoint
from misc import config
from misc.eval import retrieval
from misc.eval import encode as engine
from misc.train import loop
from misc.data.datasets import load_records
from misc.train.losses import build_loss, ranking_loss
from misc.data.words import load_word_vectors
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import load_model, run_in_process

TINY_MATCHMAP = ["--preset", "demo-matchmap", "--set", "model.trunk_cut=layer2", "--set", "train.crop_size=64",
                 "--set", "train.eval_size=64", "--set", "train.batch_size=8", "--workers", "0", "--no-progress",
                 "--device", "cpu"]
SMALL = {"trunk": "resnet18", "trunk_cut": "layer2", "region_dim": 8, "lstm_hidden": 8, "word_dim": 8}


@pytest.mark.parametrize("name, hardest", [("hard", True), ("sum", False)])
def test_dsve_loss_through_the_score_matrix_is_the_embedding_loss(name: str, hardest: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(trunk="resnet18", maps_dim=8, embed_dim=8, word_dim=4, sru_layers=1))
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)  # three captions per image
    ids = torch.arange(4).repeat_interleave(3)
    scores, pair_ids = loop.batch_scores(model, images, captions, torch.full((12,), 5), ids)
    expected = ranking_loss(images.repeat_interleave(3, dim=0) @ captions.t(), hardest=hardest, ids=ids)
    assert torch.equal(build_loss(name, 0.2)(scores, ids=pair_ids), expected)
    assert expected > 0


def test_matchmap_vectors_give_its_avg_both_scores():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="matchmap", **SMALL)).eval()
    images, words, lengths = torch.randn(3, 3, 64, 64), torch.randn(5, 6, 8), torch.tensor([6, 2, 4, 1, 3])
    with torch.no_grad():
        regions, text_out = model(images, words, lengths)
        torch.testing.assert_close(model.image_vectors(images) @ model.text_vectors(words, lengths).t(),
                                   model.score(regions, text_out, lengths))
    model.config.score = "max_img"
    assert not model.embeddable
    with pytest.raises(engine.UserError, match="model.score = 'max_img'"):
        engine.encode_images(model, [images], torch.device("cpu"))


@pytest.mark.slow
def test_retrieval_from_the_score_matrix_is_retrieval_from_the_vectors(tiny_world: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    for key, path in list(config.DEMO_PATHS.items()):
        monkeypatch.setitem(config.DEMO_PATHS, key, tiny_world / path.relative_to(config.DEMO_DIR))
    records = load_records("demo", "test")
    words = load_word_vectors(tiny_world / "words" / "demo_word2vec.bin")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="matchmap", **{**SMALL, "word_dim": words.dim}))
    options = {"workers": 0, "progress": False, "batch_size": 5}
    device = torch.device("cpu")
    vectors = engine.evaluate_records(model, records, words, device, 64, ("full",), **options)
    scores, owner = engine.score_records(model, records, words, device, 64, **options)
    images, captions, same_owner = engine.encode_records(model, records, words, device, 64, **options)
    assert torch.equal(owner, same_owner) and scores.shape == (len(images), len(captions))
    torch.testing.assert_close(scores, images @ captions.t(), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(type(model), "embeddable", property(lambda self: False))
    assert engine.evaluate_records(model, records, words, device, 64, ("full",), **options) == vectors
    assert vectors == retrieval.evaluate(images, captions, owner, protocols=("full",))


@pytest.mark.slow
def test_a_tiny_matchmap_trains_through_train_py(tiny_world: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path):
    status = run_in_process("train.py", [*TINY_MATCHMAP, "--epochs", "2", "--out", tmp_path], tiny_world,
                            monkeypatch)
    assert status == 0
    state = checkpoint.load(tmp_path / "last.pth.tar")
    history = state["metrics"]["history"]
    assert [h["trained"] for h in history] == [["3x3 conv", "LSTM", "trunk"]] * 2
    assert history[1]["loss"] < history[0]["loss"]
    assert state["config"]["model"]["arch"] == "matchmap" and state["config"]["train"]["optimizer"] == "adam"
    assert state["config"]["word_vectors"].endswith("demo_word2vec.bin")
    val = state["metrics"]["val"]
    assert set(val) == {"full"}
    assert val["full"]["rsum"] == pytest.approx(sum(val["full"][direction][f"R@{k}"] for k in (1, 5, 10)
                                                    for direction in ("caption_retrieval", "image_retrieval")))
    model = load_model(tmp_path / "best.pth.tar")
    assert model.config.arch == "matchmap" and model.config.trunk_cut == "layer2"


def test_the_original_classification_network_starts_dsve_only(tiny_world: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture, tmp_path: Path):
    original = tmp_path / "pretrained_classif.pth.tar"
    torch.save({"state_dict": {"base_layer.conv1.weight": torch.zeros(1)}}, original)
    status = run_in_process("train.py", [*TINY_MATCHMAP, "--init", original, "--out", tmp_path / "run"], tiny_world,
                            monkeypatch)
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert error.startswith(f"error: --init {original}: not a checkpoint of this project") and "DSVE only" in error
    assert not (tmp_path / "run").exists()
