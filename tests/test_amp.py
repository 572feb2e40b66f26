"""Mixed precision and the channels-last layout: bf16 on the CPU stays close to float32, fp16 without CUDA is one
line, and channels-last training computes the same steps as the default layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from misc.data.words import Encoded
from misc.train.loop import train_one_epoch
from misc.train.losses import ranking_loss
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import random_checkpoint, run_in_process

TINY = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1,
                   image_dropout=0.0, text_dropout=0.0, rnn_dropout=0.0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return random_checkpoint(tmp_path_factory.mktemp("amp") / "tiny.pth.tar", TINY, tiny_world, 64)


def extract(checkpoint: Path, world: Path, out: Path, monkeypatch, *flags: str) -> np.ndarray:
    status = run_in_process("image_features_extraction.py",
                            ["-p", checkpoint, "-d", world / "images" / "val2014", "-o", out, "--workers", "0",
                             "--no-progress", "--device", "cpu", *flags], world, monkeypatch)
    assert status == 0
    with np.load(out) as data:
        return data["features"]


def test_bf16_extraction_is_close_to_float32(tiny_checkpoint, tiny_world, tmp_path, monkeypatch):
    full = extract(tiny_checkpoint, tiny_world, tmp_path / "f32.npz", monkeypatch)
    half = extract(tiny_checkpoint, tiny_world, tmp_path / "bf16.npz", monkeypatch, "--amp", "bf16")
    assert full.shape == half.shape and len(full) == len(list((tiny_world / "images" / "val2014").glob("*.jpg")))
    cosines = (full * half).sum(axis=1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosines.min() >= 0.99, cosines  # bfloat16 keeps 8 bits of mantissa: close, not equal
    assert not np.array_equal(full, half)  # bf16 really ran


def test_fp16_without_cuda_is_one_line(tiny_checkpoint, tiny_world, tmp_path, monkeypatch, capsys):
    status = run_in_process("image_features_extraction.py",
                            ["-p", tiny_checkpoint, "-d", tiny_world / "images" / "val2014", "-o", tmp_path / "x.npz",
                             "--amp", "fp16", "--device", "cpu"], tiny_world, monkeypatch)
    error = capsys.readouterr().err.strip()
    assert status == 2 and error == "error: --amp fp16 needs CUDA; on the CPU use --amp bf16 or no --amp"
    assert not (tmp_path / "x.npz").exists()


def test_channels_last_training_takes_the_same_steps():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 64, 64, generator=g), Encoded(torch.randn(4, 3, 64, generator=g),
                                                             torch.full((4,), 3), 0, 12), torch.arange(4))
            for _ in range(3)]
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        model = build_model(TINY)
        model.image.to(memory_format=layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # steps proportional to the gradients
        stats = train_one_epoch(model, data, optimizer, ranking_loss, torch.device("cpu"), memory_format=layout,
                                progress=False)
        results.append((stats["loss"], [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for mine, theirs in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)  # convolutions may sum in another order
