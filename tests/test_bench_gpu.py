"""bench/gpu.py has no GPU to run on here: its four rows run small on the CPU, so that a change in the training,
extraction, retrieval or localization code it calls breaks this test rather than the first GPU run."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bench import gpu
from misc.presets import preset

CPU = torch.device("cpu")


def numbers(row: str) -> list[float]:
    """Every number printed after the row's colon (its measurements)."""
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", row.split(":", 1)[1])]


def test_training_row_runs_the_engine_step():
    row = gpu.training(CPU, steps=1, batch=4, preset_name="demo", size=64)
    assert row.startswith("training step, demo model, batch 4 at 64x64, bf16 autocast, channels-last: ")
    seconds, images_per_s = numbers(row)[:2]
    assert seconds > 0 and images_per_s > 0


def test_extraction_rows_embed_in_float32_and_bf16():
    rows = gpu.extraction(CPU, batches=1, batch=2, model_cfg=preset("demo")[0], size=64)
    assert [row.split(":")[0] for row in rows] == ["extraction at 64x64, batch 2, float32",
                                                   "extraction at 64x64, batch 2, bf16"]
    assert all(numbers(row)[0] > 0 for row in rows)


def rsum_by_sorting(images: np.ndarray, captions: np.ndarray) -> float:
    """R@1 + R@5 + R@10 of both directions (percent), five consecutive captions per image, ranks by sorting every
    row (the project ranks by counting instead)."""
    scores = images @ captions.T  # (N, 5N)
    owner = np.arange(len(captions)) // 5
    order = np.argsort(-scores, axis=1, kind="stable")  # captions of each image, best first
    first_own = np.array([np.flatnonzero(owner[row] == i)[0] for i, row in enumerate(order)])  # 0-based
    image_rank = np.array([np.flatnonzero(row == owner[j])[0] for j, row in enumerate(np.argsort(-scores.T, axis=1))])
    return float(sum(100.0 * np.mean(ranks < k) for ranks in (first_own, image_rank) for k in (1, 5, 10)))


def test_retrieval_rows_rank_both_protocols():
    rows = gpu.retrieval(CPU, n_images=1000, dim=32)
    assert rows[0].startswith("retrieval: one 1000 x 5000 x 32 score product on the cpu: ")
    generator = torch.Generator().manual_seed(0)  # the benchmark's vectors, drawn the same way
    images = torch.nn.functional.normalize(torch.randn(1000, 32, generator=generator), dim=1)
    captions = torch.nn.functional.normalize(images.repeat_interleave(5, 0) + 0.3 * torch.randn(
        5000, 32, generator=generator), dim=1)
    expected = rsum_by_sorting(images.numpy(), captions.numpy())
    assert 0 < expected < 600  # neither protocol would be checked by a trivial value
    for row, protocol in zip(rows[1:], ("1k", "full")):  # 1000 images: the one 1k fold is the full set
        assert row.startswith(f"retrieval: misc.eval.retrieval.evaluate {protocol} (numpy, CPU): ")
        assert float(row.rsplit("rsum ", 1)[1]) == pytest.approx(expected, abs=0.05)


def test_heatmap_row_times_eq9():
    row = gpu.heatmap_row(CPU, n_maps=3, dim=32, k=4)
    assert row.startswith("heatmaps: 3 maps x 20 phrases (D'=d=32, 13x13, k=4): ") and row.endswith(" ms")
    assert numbers(row)[-1] > 0
