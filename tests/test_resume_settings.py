"""--resume with other settings than the run's (issue 27): changes to the model, data or schedule are refused with
one line listing them, unless --allow-changes, which records them; the epochs and data workers may change."""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from misc import presets
from misc.errors import UserError
from misc.store.checkpoint import atomic_save
from misc.train.state import Resume, check_resume
from tests.conftest import run_in_process


def saved_run() -> Resume:
    model, train = presets.preset("demo")
    model = replace(model, trunk_init="scratch")
    return Resume(Path("runs/x/last.pth.tar"), {"config": {"model": asdict(model), "train": asdict(train)}})


def test_changed_settings_are_refused_listing_each_one():
    resume = saved_run()
    model, train = presets.preset("demo")  # the preset's trunk_init ("scratch" in the run) is not a change
    changed = replace(train, lr=5e-4, dataset="coco")
    with pytest.raises(UserError) as refused:
        check_resume(resume, replace(model, embed_dim=128), changed, allow=False)
    assert str(refused.value) == (
        "--resume runs/x/last.pth.tar: these settings differ from the run's (model.embed_dim: 256 -> 128; "
        "train.dataset: 'demo' -> 'coco'; train.lr: 0.001 -> 0.0005); resume without them, or pass "
        "--allow-changes to continue with them on purpose")


def test_allowed_changes_are_kept_and_harmless_ones_only_said(caplog):
    resume = saved_run()
    model, train = presets.preset("demo")
    with caplog.at_level(logging.INFO, logger="train"):
        kept = check_resume(resume, model, replace(train, epochs=9, workers=0, lr=5e-4), allow=True)
        unchanged = check_resume(resume, model, replace(train, epochs=9, workers=0), allow=False)
    assert kept.changes == ("train.lr: 0.001 -> 0.0005",) and unchanged.changes == ()
    assert "resuming runs/x/last.pth.tar with train.epochs: 4 -> 9; train.workers: 1 -> 0" in caplog.text


def test_train_refuses_a_resume_with_another_dataset_or_preset(tiny_world, tmp_path, monkeypatch, capsys):
    resume = saved_run()
    path = tmp_path / "last.pth.tar"
    atomic_save({"format": "dsve-loc", "version": 1, **resume.state, "model": {}, "epoch": 1, "best_rsum": 0.0,
                 "metrics": {}}, path)
    for flags, change in ((["--dataset", "coco"], "train.dataset: 'demo' -> 'coco'"),
                          (["--preset", "demo-matchmap"], "model.arch: 'dsve' -> 'matchmap'")):
        assert run_in_process("train.py", ["--resume", path, *flags], tiny_world, monkeypatch) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith(f"error: --resume {path}: these settings differ")
        assert change in error[0]
