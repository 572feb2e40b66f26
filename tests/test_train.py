"""train.py and eval_retrieval.py end to end on a tiny demo world, as a user runs them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from misc import checkpoint
from tests.conftest import TINY_MODEL, run_cli


@pytest.fixture(scope="module")
def two_epochs(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run_cli("train.py", "--preset", "demo", "--epochs", "2", "--out", out, *TINY_MODEL, world=tiny_world)
    return out


def test_training_lowers_the_loss_and_writes_checkpoints(two_epochs: Path):
    state = checkpoint.load(two_epochs / "last.pth.tar")
    history = state["metrics"]["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["loss"] < history[0]["loss"]
    assert state["epoch"] == 2
    assert (two_epochs / "best.pth.tar").exists()
    assert list((two_epochs / "tensorboard").glob("events.out.tfevents.*"))
    # a checkpoint alone rebuilds its model, and loads without unpickling any class
    model, _ = checkpoint.load_model(two_epochs / "best.pth.tar")
    assert model.config.embed_dim == 32
    torch.load(two_epochs / "last.pth.tar", weights_only=True)


def test_kill_and_resume_gives_the_same_next_epoch_state(two_epochs: Path, tiny_world: Path, tmp_path: Path):
    run_cli("train.py", "--preset", "demo", "--epochs", "1", "--out", tmp_path, *TINY_MODEL, world=tiny_world)
    first = checkpoint.load(tmp_path / "last.pth.tar")
    assert first["epoch"] == 1
    run_cli("train.py", "--resume", tmp_path / "last.pth.tar", "--epochs", "2", "--out", tmp_path, *TINY_MODEL,
            world=tiny_world)
    resumed = checkpoint.load(tmp_path / "last.pth.tar")
    straight = checkpoint.load(two_epochs / "last.pth.tar")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert resumed["scheduler"]["last_epoch"] == straight["scheduler"]["last_epoch"]
    assert resumed["metrics"]["history"][1]["loss"] == pytest.approx(straight["metrics"]["history"][1]["loss"])


def test_eval_retrieval_json_matches_features_path(two_epochs: Path, tiny_world: Path, tmp_path: Path):
    run_cli("eval_retrieval.py", "-p", two_epochs / "best.pth.tar", "--device", "cpu", "--workers", "0",
            "--json", tmp_path / "r.json", "--results", tmp_path / "results.json",
            "--save-features", tmp_path / "f.npz", "--no-progress", world=tiny_world)
    results = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((tmp_path / "results.json").read_text())["retrieval"] == results
    assert set(results) == {"full"}  # 12 test images: the 1k protocol is left out
    for direction in ("caption_retrieval", "image_retrieval"):
        metrics = results["full"][direction]
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 100
        assert metrics["medr"] >= 1
    again = run_cli("eval_retrieval.py", "--features", tmp_path / "f.npz", "--json", tmp_path / "r2.json")
    assert json.loads((tmp_path / "r2.json").read_text()) == results
    assert "caption retrieval" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--resume", "nowhere.pth.tar"], "checkpoint nowhere.pth.tar not found"),
    (["--words", "missing.bin"], "word vectors missing.bin not found"),
    (["--set", "model.depth=3"], "--set 'model.depth=3'"),
])
def test_train_bad_input_is_one_line(tiny_world: Path, tmp_path: Path, args: list[str], message: str):
    result = run_cli("train.py", "--preset", "demo", "--out", tmp_path, *args, world=tiny_world, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_rejects_bad_files(tmp_path: Path):
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    result = run_cli("eval_retrieval.py", "-p", tmp_path / "junk.pth.tar", check=False)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    import numpy as np
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 4)), captions=np.zeros((7, 4)))
    result = run_cli("eval_retrieval.py", "--features", tmp_path / "f.npz", check=False)
    assert result.returncode == 2 and "not 5 per image" in result.stderr


def test_sum_loss_warm_up_then_the_configured_loss():
    import train
    from misc.config import TrainConfig
    from misc.distributed import Context
    from misc.loss import triplet_loss

    torch.manual_seed(0)
    images, captions = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    ids = torch.arange(6)
    summed, hardest = (triplet_loss(images, captions, hardest=h, ids=ids) for h in (False, True))
    assert summed > hardest
    context = Context(0, 1, torch.device("cpu"))
    for cfg, expected in ((TrainConfig(loss="hard", sum_loss_epochs=2), [summed, summed, hardest, hardest]),
                          (TrainConfig(loss="hard"), [hardest] * 4), (TrainConfig(loss="sum"), [summed] * 4)):
        got = [train.epoch_loss(cfg, epoch, context)(images, captions, ids=ids) for epoch in range(4)]
        assert torch.stack(got).tolist() == torch.stack(expected).tolist()
