"""A run that diverges (issue 27): a step whose loss or gradient norm is not finite changes no weight and no
optimizer state; it is skipped and counted up to train.skip_nonfinite, and the next one stops the run with one
line naming the epoch, the step and the loss term."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from misc.data.words import Encoded
from misc.errors import UserError
from misc.train.loop import Health, train_one_epoch
from misc.train.losses import ranking_loss
from tests.conftest import TINY_MODEL, run_cli


class Pairs(torch.nn.Module):
    """A model of the training interface small enough to follow by hand: image and text outputs are linear maps."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = torch.nn.Linear(4, 3), torch.nn.Linear(2, 3)

    def forward(self, images, words, lengths):
        return self.image(images.flatten(1)), self.text(words[:, 0])

    def score(self, images, texts, lengths):
        return images @ texts.t()


def batches(count: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 2, 2, generator=g),
             Encoded(torch.randn(4, 1, 2, generator=g), torch.ones(4, dtype=torch.long), 0, 4), torch.arange(4))
            for _ in range(count)]


def poisoned(bad_steps: set[int], what: str):
    """The eq. 7 loss, made non-finite at the given steps (1-based): its value, or (``gradient``) only its
    gradient, through a term that is 0 forwards and infinite backwards."""
    calls = []

    def loss(scores, ids=None):
        calls.append(1)
        value = ranking_loss(scores, ids=ids)
        if len(calls) in bad_steps:
            if what == "loss":
                return value * float("nan")
            return value + 0.0 * torch.sqrt(scores[0, 0] - scores[0, 0])  # d sqrt(x)/dx at 0 is infinite
        return value
    return loss


def run(model, data, loss, health, optimizer=None):
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=0.1)
    return train_one_epoch(model, data, optimizer, loss, torch.device("cpu"), progress=False,
                           description="epoch 3", health=health, loss_name="hard"), optimizer


@pytest.mark.parametrize("what, term", [("loss", "hard loss"), ("gradient", "gradient norm")])
def test_a_non_finite_step_stops_the_run_before_it_changes_anything(what, term):
    torch.manual_seed(0)
    model, data = Pairs(), batches(4)
    reference = copy.deepcopy(model)
    run(reference, data[:2], poisoned(set(), what), Health())  # the two good steps alone
    with pytest.raises(UserError, match=f"^epoch 3, step 3: the {term} is (nan|inf)") as error:
        run(model, data, poisoned({3}, what), Health())
    assert "train.skip_nonfinite" in str(error.value) and "\n" not in str(error.value)
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)  # the weights of the last finite step
        assert torch.isfinite(mine).all()


def test_skipped_steps_are_counted_and_update_nothing():
    torch.manual_seed(0)
    model, data = Pairs(), batches(5)
    reference = copy.deepcopy(model)
    health = Health(allowed=2)
    stats, optimizer = run(model, data, poisoned({2, 4}, "loss"), health)
    good = [data[0], data[2], data[4]]  # the same run without the two bad batches
    reference_stats, _ = run(reference, good, poisoned(set(), "loss"), Health())
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert health.skipped == stats["skipped_steps"] == 2
    assert stats["loss"] == pytest.approx(reference_stats["loss"])  # the mean of the finite steps
    with pytest.raises(UserError, match="step 1: the hard loss is nan"):  # the budget of the run is spent
        run(model, data[:1], poisoned({1}, "loss"), health, optimizer)


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_or_skips_and_keeps_its_checkpoints_finite(tiny_world, tmp_path):
    flags = ["--preset", "demo", "--epochs", "1", *TINY_MODEL, "--set", "train.lr=1e30", "--set", "train.loss=hard",
             "--set", "train.sum_loss_epochs=0"]
    stopped = run_cli("train.py", *flags, "--out", tmp_path / "stopped", world=tiny_world, check=False)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 2 and re.fullmatch(r"error: epoch 0, step \d+: the (hard loss|gradient norm) is "
                                                    r"(nan|inf)(; .*)", last), stopped.stderr[-2000:]
    assert not (tmp_path / "stopped" / "last.pth.tar").exists()  # no epoch ended: nothing non-finite was written
    skipping = run_cli("train.py", *flags, "--set", "train.skip_nonfinite=1000", "--out", tmp_path / "skipping",
                       world=tiny_world)
    state = torch.load(tmp_path / "skipping" / "last.pth.tar", weights_only=True)
    assert state["skipped_steps"] > 0 and "step skipped" in skipping.stderr
    assert state["metrics"]["history"][0]["skipped_steps"] == state["skipped_steps"]
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
