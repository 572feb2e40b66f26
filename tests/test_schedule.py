"""The training schedule: lr, stages and loss per epoch as the original code ran them, and frozen parts."""
from __future__ import annotations

import pytest
import torch

from misc import presets
from misc.train import schedule
from misc.config import TrainConfig
from misc.errors import UserError
from models.config import ModelConfig
from misc.train.losses import npair_loss, ranking_loss
from models.joint import build_model

ALL = ("projection", "SRU", "1x1 conv", "trunk")


def first_epoch_with(plan: list[schedule.Epoch], part: str) -> int:
    return next(epoch.epoch for epoch in plan if part in epoch.parts)


def test_paper_schedule_is_the_original_code_and_paper_text_is_one_epoch_earlier():
    paper = schedule.resolve(presets.preset("paper")[1])
    assert [epoch.lr for epoch in paper[:9]] == [1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5, 3.125e-5, 3.125e-5]
    assert {epoch.lr for epoch in paper[7:]} == {3.125e-5}
    assert first_epoch_with(paper, "SRU") == 2 and first_epoch_with(paper, "trunk") == 9
    assert [epoch.parts for epoch in paper[:3]] == [("projection",), ("projection",), ("projection", "SRU")]
    assert paper[8].parts == ("projection", "SRU") and paper[9].parts == ALL
    assert {epoch.loss for epoch in paper} == {"hard"}

    text = schedule.resolve(presets.preset("paper-text")[1])
    halved = [epoch.epoch for previous, epoch in zip(text, text[1:]) if epoch.lr == previous.lr / 2]
    assert halved == [2, 3, 4, 5, 6] and text[1].lr == 1e-3
    assert first_epoch_with(text, "SRU") == 2 and first_epoch_with(text, "trunk") == 8


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_the_scheduler_gives_the_resolved_lr_of_every_epoch(name):
    cfg = presets.preset(name)[1]
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = schedule.build_scheduler(optimizer, cfg)
    for epoch in schedule.resolve(cfg):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(epoch.lr, rel=1e-12), epoch
        optimizer.step()
        scheduler.step()


def test_the_printed_schedule_has_a_row_per_change():
    cfg = TrainConfig(epochs=12, lr=1e-3, lr_halve_epochs=[3], text_from_epoch=2, trunk_from_epoch=9,
                      sum_loss_epochs=1)
    rows = schedule.describe(cfg).splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["0", "1", "2", "3-8", "9-11"]
    assert "5.000e-04" in rows[3] and "projection, SRU, 1x1 conv, trunk" in rows[4]
    assert "eq. 5" in rows[0] and "eq. 7" in rows[1]


def test_sum_loss_warm_up_then_the_configured_loss():
    torch.manual_seed(0)
    images, captions = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    ids = torch.arange(6)
    summed, hardest = (ranking_loss(images @ captions.t(), hardest=h, ids=ids) for h in (False, True))
    npair = npair_loss(images @ captions.t(), ids=ids)
    assert summed > hardest
    for cfg, expected in ((TrainConfig(loss="hard", sum_loss_epochs=2), [summed, summed, hardest, hardest]),
                          (TrainConfig(loss="hard"), [hardest] * 4), (TrainConfig(loss="sum"), [summed] * 4),
                          (TrainConfig(loss="npair", sum_loss_epochs=1), [summed, npair, npair, npair])):
        got = [schedule.epoch_loss(cfg, epoch)(images @ captions.t(), ids=ids) for epoch in range(4)]
        assert torch.stack(got).tolist() == torch.stack(expected).tolist()


def test_step_decay_and_sgd_with_momentum():
    cfg = TrainConfig(epochs=7, lr=1e-2, lr_halve_epochs=[], lr_decay_every=3, lr_decay=0.1, optimizer="sgd",
                      momentum=0.8, text_from_epoch=0, trunk_from_epoch=0)
    assert [epoch.lr for epoch in schedule.resolve(cfg)] == pytest.approx([1e-2] * 3 + [1e-3] * 3 + [1e-4])
    model = torch.nn.Linear(2, 1)
    optimizer = schedule.build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.8
    scheduler = schedule.build_scheduler(optimizer, cfg)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    for epoch in schedule.resolve(cfg):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(epoch.lr, rel=1e-12), epoch
        optimizer.step()
        scheduler.step()
    header, _, *rows = schedule.describe(cfg).splitlines()
    assert header.startswith("schedule: SGD (momentum 0.8);")
    assert [row.split()[0] for row in rows] == ["0-2", "3-5", "6"]
    assert schedule.describe(TrainConfig()).startswith("schedule: Adam;")
    assert isinstance(schedule.build_optimizer(model, TrainConfig()), torch.optim.Adam)


def test_matchmap_parts_join_by_the_same_epochs():
    cfg = TrainConfig(text_from_epoch=1, trunk_from_epoch=2, frozen_trunk=["conv1", "bn1", "layer1"],
                      frozen_mode="eval")
    assert [schedule.parts_at(cfg, epoch, "matchmap") for epoch in range(3)] == [
        ("3x3 conv",), ("3x3 conv", "LSTM"), ("3x3 conv", "LSTM", "trunk")]
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="matchmap", trunk="resnet18", trunk_cut="layer2", region_dim=8,
                                    lstm_hidden=8, word_dim=8))
    assert schedule.enter_stage(model, 0, cfg) == ["3x3 conv"]
    assert not any(p.requires_grad for p in model.text.parameters()) and not model.image.trunk.training
    assert schedule.enter_stage(model, 2, cfg) == ["3x3 conv", "LSTM", "trunk"]
    assert not model.image.trunk.layer1.training and model.image.trunk.layer2.training
    assert not any(p.requires_grad for p in model.image.trunk.conv1.parameters())


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    images, words, lengths = torch.randn(4, 3, 64, 64), torch.randn(4, 5, 8), torch.tensor([5, 3, 4, 2])
    image_emb, text_emb = model(images, words, lengths)
    optimizer.zero_grad(set_to_none=True)
    ranking_loss(image_emb @ text_emb.t(), ids=torch.arange(4)).backward()
    optimizer.step()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_frozen_parts_never_change_and_keep_or_update_batch_statistics(mode):
    torch.manual_seed(0)
    model = build_model(ModelConfig(trunk="resnet18", maps_dim=16, embed_dim=16, word_dim=8, sru_layers=2,
                                    weldon_k=2))
    cfg = TrainConfig(text_from_epoch=1, trunk_from_epoch=2, frozen_trunk=["conv1", "bn1", "layer1"],
                      frozen_mode=mode)
    optimizer = schedule.build_optimizer(model, cfg)
    for epoch, trained in ((0, ["projection"]), (2, list(ALL))):
        assert schedule.enter_stage(model, epoch, cfg) == trained
        frozen = schedule.frozen_modules(model, epoch, cfg)
        assert all(module.training == (mode == "train") for module in frozen)
        frozen_params = {id(p) for module in frozen for p in module.parameters()}
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        statistics = model.image.trunk.bn1.running_mean.clone()
        one_step(model, optimizer)
        for name, parameter in model.named_parameters():
            if id(parameter) in frozen_params:
                assert torch.equal(parameter, before[name]), name
        assert not torch.equal(model.image.proj.weight, before["image.proj.weight"])
        assert torch.equal(model.image.trunk.bn1.running_mean, statistics) == (mode == "eval")
    assert not torch.equal(model.image.trunk.layer4[0].conv1.weight, before["image.trunk.layer4.0.conv1.weight"])


def test_an_unknown_frozen_mode_is_refused_when_the_config_is_made():
    with pytest.raises(UserError, match="train.frozen_mode = 'frozen': unknown; choose one of train, eval"):
        TrainConfig(frozen_mode="frozen")
