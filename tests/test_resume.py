"""Nothing lost: runs write only into their own folder, checkpoints are written whole or not at all, a stopped or
killed run resumes to exactly the state of one that never stopped, and bad checkpoint files are one-line errors."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from misc.train import run as train
from misc.store import checkpoint
from misc import config
from misc.errors import UserError
from models.config import ModelConfig
from tests.conftest import TINY_MODEL, load_model, run_in_process

SMALL = [*TINY_MODEL, "--limit", "32"]  # 4 steps per epoch


def one_line_error(captured: pytest.CaptureFixture, status: int) -> str:
    error = captured.readouterr().err.strip()
    assert status == 2 and error.startswith("error:") and len(error.splitlines()) == 1, error
    return error


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp*"))


@pytest.fixture(scope="module")
def straight(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs that nothing interrupts."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_in_process("train.py", ["--preset", "demo", "--epochs", "2", "--out", out, *SMALL], tiny_world,
                              monkeypatch) == 0
    return out


def assert_same_run(resumed: dict, straight: dict) -> None:
    assert resumed["epoch"] == straight["epoch"] and "step" not in resumed
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
    for index, moments in straight["optimizer"]["state"].items():
        for name, value in moments.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][index][name], value, rtol=0, atol=1e-6)
    assert resumed["scheduler"] == straight["scheduler"]
    assert [h["loss"] for h in resumed["metrics"]["history"]] == pytest.approx(
        [h["loss"] for h in straight["metrics"]["history"]], rel=1e-6)
    assert (resumed["best_epoch"], resumed["best_rsum"]) == (straight["best_epoch"], straight["best_rsum"])


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_the_position_and_resume_in_its_own_folder_is_exact(
        straight: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog):
    caplog.set_level(logging.INFO, logger="misc.store.checkpoint")
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    other = tmp_path / "runs" / "demo" / checkpoint.BEST  # another run's best, in the default folder
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run's best model")
    calls = []
    epoch_loss = train.epoch_loss

    def signalled_loss(*args, **kwargs):
        loss_fn = epoch_loss(*args, **kwargs)

        def wrapped(*tensors, **options):
            calls.append(1)
            if len(calls) == 6:  # epoch 1, step 2: the cluster pre-empts the job
                signal.raise_signal(signal.SIGTERM)
            return loss_fn(*tensors, **options)
        return wrapped

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(train, "epoch_loss", signalled_loss)
        status = run_in_process("train.py", ["--preset", "demo", "--epochs", "2", "--out", run, "--save-every", "3",
                                             *SMALL], tiny_world, monkeypatch)
    assert status == 128 + signal.SIGTERM
    stopped = checkpoint.load(run / checkpoint.LAST)
    assert (stopped["epoch"], stopped["step"], stopped["partial"]["steps"]) == (1, 2, 2)
    assert len(stopped["rng"]) == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert run_in_process("train.py", ["--resume", run / checkpoint.LAST, *SMALL], tiny_world, monkeypatch) == 0
    assert_same_run(checkpoint.load(run / checkpoint.LAST), checkpoint.load(straight / checkpoint.LAST))
    assert other.read_bytes() == b"another run's best model"
    best = checkpoint.load(run / checkpoint.BEST)
    assert (best["epoch"], best["best_rsum"]) == (best["best_epoch"], checkpoint.load(straight / "best.pth.tar")[
        "best_rsum"])
    assert "holds the run's best" in caplog.text


@pytest.mark.slow
def test_save_every_writes_every_n_steps_and_sigusr1_stops_at_the_next_step(straight: Path, tiny_world: Path,
                                                                             tmp_path: Path, monkeypatch):
    """--save-every 2 over epochs of 4 steps: last.pth.tar holds step 2 of an epoch after its steps 2 and 3 (never a
    step 1 or 3 of its own, and the epoch's last step is the epoch's checkpoint); SIGUSR1 during step 3 writes step 3
    and exits 128 + SIGUSR1; resuming from it ends where the straight run ends."""
    run = tmp_path / "run"
    seen = []  # (epoch, step) of last.pth.tar when each step starts
    epoch_loss = train.epoch_loss

    def watched_loss(*args, **kwargs):
        loss_fn = epoch_loss(*args, **kwargs)

        def wrapped(*tensors, **options):
            state = checkpoint.load(run / checkpoint.LAST) if (run / checkpoint.LAST).exists() else None
            seen.append(None if state is None else (state["epoch"], state.get("step")))
            if len(seen) == 7:  # epoch 1, step 3
                signal.raise_signal(signal.SIGUSR1)
            return loss_fn(*tensors, **options)
        return wrapped

    with monkeypatch.context() as patched:
        patched.setattr(train, "epoch_loss", watched_loss)
        status = run_in_process("train.py", ["--preset", "demo", "--epochs", "2", "--out", run, "--save-every", "2",
                                             *SMALL], tiny_world, monkeypatch)
    assert status == 128 + signal.SIGUSR1
    assert seen == [None, None, (0, 2), (0, 2), (1, None), (1, None), (1, 2)]
    stopped = checkpoint.load(run / checkpoint.LAST)
    assert (stopped["epoch"], stopped["step"], stopped["partial"]["steps"]) == (1, 3, 3)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert run_in_process("train.py", ["--resume", run / checkpoint.LAST, *SMALL], tiny_world, monkeypatch) == 0
    assert_same_run(checkpoint.load(run / checkpoint.LAST), checkpoint.load(straight / checkpoint.LAST))


@pytest.mark.slow
def test_a_kill_while_writing_epoch_1_resumes_to_the_same_last_and_best(straight: Path, tiny_world: Path,
                                                                        tmp_path: Path, monkeypatch):
    """The third save is epoch 1's best (if it improved) or its last: killed half-way either way."""
    saves = []
    write = Path.write_bytes  # a checkpoint's bytes reach the disk through it (misc.store.checkpoint.atomic_save)

    def killed_write(path: Path, data: bytes) -> int:
        if ".pth.tar" in path.name:
            saves.append(path)
            if len(saves) == 3:
                write(path, bytes(data[:16]))
                raise KeyboardInterrupt
        return write(path, data)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "write_bytes", killed_write)
        status = run_in_process("train.py", ["--preset", "demo", "--epochs", "2", "--out", tmp_path, *SMALL],
                                tiny_world, monkeypatch)
    assert status == 130 and leftovers(tmp_path) == []
    for name in (checkpoint.LAST, checkpoint.BEST):  # each still epoch 0's, whole
        assert checkpoint.load(tmp_path / name)["epoch"] == 1
    assert run_in_process("train.py", ["--resume", tmp_path / checkpoint.LAST, *SMALL], tiny_world, monkeypatch) == 0
    for name in (checkpoint.LAST, checkpoint.BEST):
        assert_same_run(checkpoint.load(tmp_path / name), checkpoint.load(straight / name))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(straight: Path, tiny_world: Path,
                                                                  tmp_path: Path, monkeypatch, capsys):
    for name in (checkpoint.LAST, checkpoint.BEST):
        shutil.copy(straight / name, tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in (checkpoint.LAST, checkpoint.BEST)}

    write = Path.write_bytes

    def full_disk(path: Path, data: bytes) -> None:  # the checkpoint's bytes reach the disk through write_bytes
        write(path, bytes(data[:16]))
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    status = run_in_process("train.py", ["--resume", tmp_path / checkpoint.LAST, "--epochs", "3", *SMALL],
                            tiny_world, monkeypatch)
    error = one_line_error(capsys, status)
    assert f"cannot write {tmp_path}{os.sep}" in error and ".pth.tar: no space left on the device" in error
    assert {name: (tmp_path / name).read_bytes() for name in before} == before and leftovers(tmp_path) == []


def test_a_new_run_never_takes_another_runs_default_folder(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "RUNS", tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / checkpoint.LAST).write_bytes(b"another run")
    status = run_in_process("train.py", ["--preset", "demo", *SMALL], tiny_world, monkeypatch)
    error = one_line_error(capsys, status)
    assert f"--resume {tmp_path / 'demo' / checkpoint.LAST}" in error and "--out DIR" in error
    assert (tmp_path / "demo" / checkpoint.LAST).read_bytes() == b"another run"


def test_a_batch_larger_than_the_data_is_one_line_and_a_large_limit_a_warning(tiny_world, tmp_path, monkeypatch,
                                                                              capsys, caplog):
    status = run_in_process("train.py", ["--preset", "demo", "--out", tmp_path, *TINY_MODEL, "--limit", "1000",
                                         "--batch-size", "64"], tiny_world, monkeypatch)
    assert "batch size 64 is more than the 48 items of an epoch (images)" in one_line_error(capsys, status)
    assert "--limit 1000: demo train has only 48 images" in caplog.text


# --------------------------------------------------------------------------- writing checkpoints

def state(epoch: int, best_epoch: int, value: float = 0.0, **extra) -> dict:
    return {"format": checkpoint.FORMAT, "version": 1, "config": {"model": asdict(ModelConfig())},
            "model": {"w": torch.full((3,), value)}, "epoch": epoch, "best_rsum": float(best_epoch),
            "best_epoch": best_epoch, "metrics": {}, **extra}


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    checkpoint.atomic_save(state(1, 1, value=1.0), tmp_path / "last.pth.tar")
    for failure in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        write = Path.write_bytes

        def failing(path: Path, data: bytes, failure: BaseException = failure, write=write) -> None:
            write(path, b"partial")
            raise failure

        monkeypatch.setattr(Path, "write_bytes", failing)
        with pytest.raises(UserError if isinstance(failure, OSError) else KeyboardInterrupt) as raised:
            checkpoint.atomic_save(state(2, 2), tmp_path / "last.pth.tar")
        if isinstance(failure, OSError):
            assert str(raised.value).startswith(f"cannot write {tmp_path / 'last.pth.tar'}: no space left")
        monkeypatch.undo()
        assert checkpoint.load(tmp_path / "last.pth.tar")["epoch"] == 1 and leftovers(tmp_path) == []


def test_best_is_written_before_last_so_it_is_never_older(tmp_path, monkeypatch):
    checkpoint.save_training(state(1, 1), tmp_path, is_best=True)
    writes = []
    save = checkpoint.atomic_save

    def killed_after_best(obj, path):
        writes.append(Path(path).name)
        if Path(path).name == checkpoint.LAST:
            raise KeyboardInterrupt
        save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", killed_after_best)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_training(state(2, 2), tmp_path, is_best=True)
    assert writes == [checkpoint.BEST, checkpoint.LAST]
    assert checkpoint.load(tmp_path / checkpoint.BEST)["epoch"] == 2  # newer than last: replayed on resume
    assert checkpoint.load(tmp_path / checkpoint.LAST)["epoch"] == 1


def test_resume_checks_best_and_repairs_a_stale_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="misc.store.checkpoint")
    checkpoint.atomic_save(state(1, 1), tmp_path / checkpoint.BEST)
    last = state(2, 2, value=2.0)  # an older version was killed after writing last, before copying it to best
    checkpoint.check_best(tmp_path, last)
    repaired = checkpoint.load(tmp_path / checkpoint.BEST)
    assert repaired["epoch"] == 2 and torch.equal(repaired["model"]["w"], last["model"]["w"])
    assert "rewritten from the resumed checkpoint" in caplog.text
    caplog.clear()
    checkpoint.check_best(tmp_path, state(3, 2))  # best is epoch 2: as recorded
    assert "holds the run's best (epoch 2" in caplog.text
    checkpoint.check_best(tmp_path, state(4, 3))  # the best epoch 3 is not the resumed one: lost, and said so
    assert "not the run's best (epoch 3" in caplog.text and checkpoint.load(tmp_path / checkpoint.BEST)["epoch"] == 2


# --------------------------------------------------------------------------- bad checkpoint files

@pytest.mark.parametrize("content, message", [
    ({"format": "dsve-loc", "version": 1, "model": {}}, "holds no model configuration"),
    ({"format": "dsve-loc", "version": 1, "config": argparse.Namespace(model={}), "model": {}},
     "holds a Python object (argparse.Namespace at config)"),
    ({"format": "dsve-loc", "version": 1, "config": {"model": asdict(ModelConfig())},
      "model": {"w": argparse.Namespace()}}, "holds a Python object (argparse.Namespace at model.w)"),
    ({"format": "dsve-loc", "version": 1, "config": {"model": asdict(ModelConfig(trunk="resnet1521"))}, "model": {}},
     "model.trunk = 'resnet1521': unknown (did you mean resnet152?)"),
])
def test_bad_checkpoints_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.pth.tar"
    torch.save(content, path)
    for use in (load_model, checkpoint.describe):
        if "trunk" in message and use is checkpoint.describe:
            continue  # describing a checkpoint builds no network
        with pytest.raises(UserError) as raised:
            use(path)
        assert str(raised.value).startswith(str(path)) and message in str(raised.value)
        assert len(str(raised.value).splitlines()) == 1


def test_resuming_a_checkpoint_without_config_or_training_state_is_one_line(tiny_world, tmp_path, monkeypatch,
                                                                            capsys):
    torch.save({"format": "dsve-loc", "version": 1, "model": {}}, tmp_path / "a.pth.tar")
    status = run_in_process("train.py", ["--resume", tmp_path / "a.pth.tar"], tiny_world, monkeypatch)
    assert "holds no model configuration" in one_line_error(capsys, status)
    unknown = {"model": {**asdict(ModelConfig(word_dim=64)), "trunk": "resnet1521"}, "train": {"dataset": "demo"}}
    torch.save(state(1, 1, config=unknown), tmp_path / "b.pth.tar")
    status = run_in_process("train.py", ["--resume", tmp_path / "b.pth.tar"], tiny_world, monkeypatch)
    assert f"{tmp_path / 'b.pth.tar'}: model.trunk = 'resnet1521'" in one_line_error(capsys, status)
