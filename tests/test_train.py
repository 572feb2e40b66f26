"""train.py and eval_retrieval.py end to end on a tiny demo world, as a user runs them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from misc.store import checkpoint
from tests.conftest import TINY_MODEL, load_model, run_cli, run_in_process


@pytest.fixture(scope="module")
def trunk_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format state dict of the demo's trunk (resnet18), other than the one a run draws itself."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def two_epochs(tiny_world: Path, trunk_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run_cli("train.py", "--preset", "demo", "--epochs", "2", "--out", out, "--resnet-weights", trunk_weights,
            *TINY_MODEL, world=tiny_world)
    return out


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_checkpoints(two_epochs: Path, trunk_weights: Path):
    state = checkpoint.load(two_epochs / "last.pth.tar")
    history = state["metrics"]["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["loss"] < history[0]["loss"]
    assert state["epoch"] == 2
    # the trunk started from the file, which the config records; the demo never trains conv1 nor layer1
    assert state["config"]["model"]["trunk_init"] == f"file:{trunk_weights.resolve()}"
    given = torch.load(trunk_weights, weights_only=True)
    for key in ("conv1.weight", "layer1.0.bn1.running_mean"):
        torch.testing.assert_close(state["model"][f"image.trunk.{key}"], given[key], rtol=0, atol=0)
    assert not torch.equal(state["model"]["image.trunk.layer4.0.conv1.weight"], given["layer4.0.conv1.weight"])
    assert (two_epochs / "best.pth.tar").exists()
    assert list((two_epochs / "tensorboard").glob("events.out.tfevents.*"))
    # a checkpoint alone rebuilds its model, and loads without unpickling any class
    model = load_model(two_epochs / "best.pth.tar")
    assert model.config.embed_dim == 32
    torch.load(two_epochs / "last.pth.tar", weights_only=True)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_next_epoch_state(two_epochs: Path, tiny_world: Path, trunk_weights: Path,
                                                         tmp_path: Path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(trunk_weights.read_bytes())
    run_cli("train.py", "--preset", "demo", "--epochs", "1", "--out", tmp_path, "--resnet-weights", weights,
            *TINY_MODEL, world=tiny_world)
    first = checkpoint.load(tmp_path / "last.pth.tar")
    assert first["epoch"] == 1
    weights.unlink()  # resuming takes the weights from the checkpoint, never from the trunk's source
    run_cli("train.py", "--resume", tmp_path / "last.pth.tar", "--epochs", "2", "--out", tmp_path, *TINY_MODEL,
            world=tiny_world)
    resumed = checkpoint.load(tmp_path / "last.pth.tar")
    straight = checkpoint.load(two_epochs / "last.pth.tar")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert resumed["scheduler"]["last_epoch"] == straight["scheduler"]["last_epoch"]
    assert resumed["metrics"]["history"][1]["loss"] == pytest.approx(straight["metrics"]["history"][1]["loss"])


@pytest.mark.slow
def test_eval_retrieval_json_matches_features_path(two_epochs: Path, tiny_world: Path, tmp_path: Path):
    run_cli("eval_retrieval.py", "-p", two_epochs / "best.pth.tar", "--device", "cpu", "--workers", "0",
            "--json", tmp_path / "r.json", "--results", tmp_path / "results.json",
            "--save-features", tmp_path / "f.npz", "--no-progress", world=tiny_world)
    results = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((tmp_path / "results.json").read_text())["retrieval"] == results
    assert set(results["metrics"]) == {"images", "captions", "full"}  # 12 test images: the 1k protocol is left out
    # the full protocol re-derived from the saved features by sorting cosine similarities (the project counts)
    with np.load(tmp_path / "f.npz") as saved:
        images, captions, owner = saved["images"], saved["captions"], saved["owner"]
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    captions = captions / np.linalg.norm(captions, axis=1, keepdims=True)
    scores = images @ captions.T  # (N, M)
    caption_ranks = np.array([1 + np.flatnonzero(owner[np.argsort(-row, kind="stable")] == i)[0]
                              for i, row in enumerate(scores)])  # each image's first own caption
    image_ranks = np.array([1 + np.flatnonzero(np.argsort(-column, kind="stable") == owner[j])[0]
                            for j, column in enumerate(scores.T)])  # each caption's image
    for direction, ranks in (("caption_retrieval", caption_ranks), ("image_retrieval", image_ranks)):
        metrics = results["metrics"]["full"][direction]
        for k in (1, 5, 10):
            assert metrics[f"R@{k}"] == pytest.approx(100 * np.mean(ranks <= k)), (direction, k)
        assert metrics["medr"] == pytest.approx(float(np.median(ranks)))
    again = run_cli("eval_retrieval.py", "--features", tmp_path / "f.npz", "--json", tmp_path / "r2.json")
    assert json.loads((tmp_path / "r2.json").read_text())["metrics"] == results["metrics"]
    assert "caption retrieval" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--resume", "nowhere.pth.tar"], "checkpoint nowhere.pth.tar not found"),
    (["--words", "missing.bin"], "word vectors missing.bin not found"),
    (["--set", "model.depth=3"], "--set model.depth=3"),
])
def test_train_bad_input_is_one_line(tiny_world: Path, tmp_path: Path, args: list[str], message: str):
    result = run_cli("train.py", "--preset", "demo", "--out", tmp_path, *args, world=tiny_world, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_rejects_bad_files(tmp_path: Path):
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    result = run_cli("eval_retrieval.py", "-p", tmp_path / "junk.pth.tar", check=False)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    import numpy as np
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 4)), captions=np.zeros((7, 4)))
    result = run_cli("eval_retrieval.py", "--features", tmp_path / "f.npz", check=False)
    assert result.returncode == 2 and "not 5 per image" in result.stderr


def one_line_error(captured: pytest.CaptureFixture, status: int) -> str:
    error = captured.readouterr().err.strip()
    assert status == 2 and error.startswith("error:") and len(error.splitlines()) == 1, error
    return error


def test_paper_preset_refuses_to_start_without_a_trunk_source(tiny_world, monkeypatch, capsys):
    status = run_in_process("train.py", ["--preset", "paper"], tiny_world, monkeypatch)
    error = one_line_error(capsys, status)
    for choice in ("--init CKPT", "--resnet-weights", "--weights IMAGENET1K_V1|IMAGENET1K_V2", "--from-scratch"):
        assert choice in error


def test_imagenet_weights_are_never_downloaded(tiny_world, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    status = run_in_process("train.py", ["--preset", "paper", "--weights", "IMAGENET1K_V1"], tiny_world, monkeypatch)
    error = one_line_error(capsys, status)
    expected = tmp_path / "hub" / "checkpoints" / "resnet152-394f9c45.pth"
    assert f"{expected} not found" in error and "https://download.pytorch.org/models/resnet152-394f9c45.pth" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (b"not a state dict", "is not a state dict that torch.load(weights_only=True) reads"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "weights.pth (the resnet18 trunk) does not fit"),
    ({"state_dict": {}}, "not a state dict of tensors"),
])
def test_a_wrong_trunk_weights_file_is_one_line(tiny_world, monkeypatch, capsys, tmp_path, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    status = run_in_process("train.py", ["--preset", "demo", "--resnet-weights", path, "--out", tmp_path,
                                         *TINY_MODEL], tiny_world, monkeypatch)
    assert message in one_line_error(capsys, status)


def test_resume_takes_no_trunk_source(tiny_world, monkeypatch, capsys):
    status = run_in_process("train.py", ["--resume", "run/last.pth.tar", "--from-scratch"], tiny_world, monkeypatch)
    assert "--resume continues from the run's own weights" in one_line_error(capsys, status)
