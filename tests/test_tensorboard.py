"""TensorBoard of a training run (misc/train/tblog.py): one loss point per step, tagged with the loss in use; lr per
step; the hyper-parameters with the final metrics; and train.py --export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from misc.store import checkpoint
from misc.inference import Inference
from tests.conftest import TINY_MODEL, run_in_process


@pytest.mark.slow
def test_a_run_logs_every_step_and_exports(tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run, exported = tmp_path / "run", tmp_path / "exported"
    status = run_in_process("train.py", ["--preset", "demo", "--epochs", "2", "--set", "train.sum_loss_epochs=1",
                                         "--from-scratch", "--out", run, "--export", exported, *TINY_MODEL],
                            tiny_world, monkeypatch)
    assert status == 0
    train_images = sum(image["split"] == "train" for image in json.loads(
        (tiny_world / "dataset_coco.json").read_text())["images"])
    steps = train_images // 8  # train.batch_size=8 images, each with all its captions (group_captions)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    sums = [[point.step for point in events.Scalars(tag)] for tag in ("train/loss/triplet_sum",
                                                                     "train/loss/triplet_hardest")]
    assert sums == [list(range(1, steps + 1)), list(range(steps + 1, 2 * steps + 1))]
    assert [point.step for point in events.Scalars("train/lr")] == list(range(1, 2 * steps + 1))
    history = checkpoint.load(run / checkpoint.LAST)["metrics"]["history"]
    first = [point.value for point in events.Scalars("train/loss/triplet_sum")]
    assert sum(first) / steps == pytest.approx(history[0]["loss"], rel=1e-5)
    assert [point.step for point in events.Scalars("val/rsum")] == [steps, 2 * steps]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))
    assert events.Scalars("final/val_rsum")[0].value == pytest.approx(history[-1]["val_rsum"], rel=1e-5)
    source = run / (checkpoint.BEST if (run / checkpoint.BEST).exists() else checkpoint.LAST)
    image = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(Inference.load(exported, device="cpu").embed_images(image),
                               Inference.load(source, device="cpu").embed_images(image), rtol=0, atol=0)
