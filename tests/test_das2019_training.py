"""Training as Das et al. 2019 ran it: the das2019 presets pinned value by value (typed from the paper and their
code, github deepandas11/LocNet), epochs of N batches drawn with replacement, the mean loss reduction, the plain
resize, training on the Flickr30K Entities split files and the refusal to train on Entities test images."""
from __future__ import annotations

import json
import signal
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from misc import config
from misc.config import TrainConfig
from misc.data.datasets import Record, load_records, train_transform
from misc.data.flickr_entities import check_test_overlap
from misc.errors import UserError
from misc.train import distributed
from misc.train.run import RunOptions, load_data
from misc.train.schedule import build_scheduler, epoch_loss, lr_at
from models.config import ModelConfig
from tests.conftest import run_in_process

# Every TrainConfig value the das2019 presets resolve to. Paper (Das et al. 2019, §4): N-pair loss, SGD with
# momentum 0.9, lr 1e-3 divided by 10 every 10 epochs, batch 64, 224 x 224 inputs, everything trained from the start.
DAS2019_TRAIN = {
    "dataset": "coco", "split": "trainrv", "val_split": "val", "words": "", "epochs": 30, "batch_size": 64,
    "lr": 1e-3, "lr_halve_epochs": [], "text_from_epoch": 0, "trunk_from_epoch": 0, "frozen_trunk": [],
    "frozen_mode": "train", "margin": 0.1, "loss": "npair", "sum_loss_epochs": 0, "grad_clip": None,
    "skip_nonfinite": 0, "optimizer": "sgd", "momentum": 0.9, "lr_decay_every": 10, "lr_decay": 0.1,
    "lr_decay_first": 0, "crop_size": 224, "crop_scale": [0.08, 1.0], "flip": False, "resize_only": True,
    "eval_size": 224, "test_size": 224, "captions_per_image": 5, "group_captions": False, "workers": 4, "seed": 0,
    "steps_per_epoch": 0, "loss_reduction": "sum", "allow_test_overlap": False,
}
# Their code's defaults: main.py (--lr 0.001, --lr_decay 10, --n_epochs 10, --margin 0.1, --loss_type triplet,
# --sampler hard, --optim sgd with momentum 0.9, -b 64, a Resize((224, 224)) transform, --dataset flickr),
# steps/utils.py custom_loss (hinges on the hardest negatives, divided by the batch size), steps/utils.py
# adjust_learning_rate (lr x 0.1 ** (epoch // 10), epochs counted from 1) and steps/models_train.py (100 steps an
# epoch, each batch drawn with replacement).
DAS2019_CODE_TRAIN = {
    **DAS2019_TRAIN, "dataset": "flickr30k_entities", "split": "train", "val_split": "val", "epochs": 10,
    "lr_decay_first": 9,
    "loss": "hard", "margin": 0.1, "loss_reduction": "mean", "steps_per_epoch": 100,
}
# VGG-19 conv5_4, 3x3 conv to 1024 regions, a 1024 LSTM over 300-d GloVe words, average-both matchmap scores; the
# paper names no phrase steps and no unknown-word vectors (our defaults).
DAS2019_MODEL = {"arch": "matchmap", "trunk": "vgg19", "trunk_cut": "conv5", "region_dim": 1024, "lstm_hidden": 1024,
                 "word_dim": 300, "score": "avg_both", "trunk_init": "", "text_units": "words",
                 "unknown_words": "zero"}
# Their code: main.py's --parse_mode phrase (dataloader/flickr_loader.py: a bracketed phrase's mean GloVe is one
# LSTM input) and data/flickr_30kentities/flickr_vocab_gen.py (a word missing from GloVe gets a vector drawn from
# the table's per-dimension mean and std).
DAS2019_CODE_MODEL = {**DAS2019_MODEL, "text_units": "phrases", "unknown_words": "random"}


@pytest.mark.parametrize(("name", "expected", "expected_model"), [("das2019", DAS2019_TRAIN, DAS2019_MODEL),
                                                                  ("das2019-code", DAS2019_CODE_TRAIN,
                                                                   DAS2019_CODE_MODEL)])
def test_the_das2019_presets_resolve_to_the_paper_and_their_code(name, expected, expected_model):
    model, train = config.preset(name)
    assert asdict(train) == expected
    assert {key: asdict(model)[key] for key in expected_model} == expected_model


def test_das2019_code_divides_the_lr_when_their_epoch_counter_reaches_10():
    cfg = config.preset("das2019-code")[1]
    their = [1e-3 * 0.1 ** (counter // 10) for counter in range(1, 11)]  # their epochs 1..10 are ours 0..9
    assert [lr_at(cfg, epoch) for epoch in range(10)] == pytest.approx(their, rel=1e-12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    for lr in their:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        optimizer.step()
        scheduler.step()
    later = TrainConfig(epochs=25, lr_halve_epochs=[], lr_decay_every=10, lr_decay_first=3)
    assert [lr_at(later, epoch) for epoch in (2, 3, 12, 13, 23)] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5, 1e-6])
    with pytest.raises(UserError, match="train.lr_decay_first = 3 needs train.lr_decay_every > 0"):
        TrainConfig(lr_halve_epochs=[], lr_decay_first=3)


def test_every_other_preset_keeps_the_full_pass_the_sum_and_the_crop():
    for name in set(config.PRESETS) - {"das2019", "das2019-code"}:
        train = config.preset(name)[1]
        assert (train.steps_per_epoch, train.loss_reduction, train.resize_only, train.lr_decay_first) == (
            0, "sum", False, 0), name


class Items(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def drawn(size: int, seed: int, epoch: int, draws: int, rank: int = 0, world: int = 1, start: int = 0) -> list[int]:
    sampler = distributed.EpochSampler(Items(size), distributed.Context(rank, world, torch.device("cpu")), seed,
                                       draws)
    sampler.set_epoch(epoch, start)
    order = list(sampler)
    assert len(order) == len(sampler)
    return order


def test_steps_per_epoch_draws_with_replacement_per_seed_and_epoch():
    order = drawn(10, seed=3, epoch=2, draws=4 * 8)  # 4 batches of 8 from 10 items
    assert len(order) == 32 and set(order) <= set(range(10))
    assert len(set(order)) < len(order)  # 32 draws of 10 items repeat some: with replacement
    assert drawn(10, seed=3, epoch=2, draws=32) == order  # the same (seed, epoch), the same batches
    assert drawn(10, seed=3, epoch=3, draws=32) != order and drawn(10, seed=4, epoch=2, draws=32) != order
    assert drawn(10, seed=0, epoch=1, draws=32) != drawn(10, seed=1, epoch=0, draws=32)  # the pair, not its sum
    # resumed after 12 items (k batches): the same later ones
    assert drawn(10, seed=3, epoch=2, draws=32, start=12) == order[12:]
    # over two processes: each its half, dealt in turn from the one order
    halves = [drawn(10, seed=3, epoch=2, draws=32, rank=rank, world=2) for rank in (0, 1)]
    assert [item for pair in zip(*halves) for item in pair] == order


def test_no_steps_per_epoch_keeps_torchs_shuffle():
    reference = DistributedSampler(Items(10), num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    reference.set_epoch(2)
    assert drawn(10, seed=3, epoch=2, draws=0) == list(reference)
    assert drawn(10, seed=3, epoch=2, draws=0, start=4) == list(reference)[4:]


def test_a_run_with_steps_per_epoch_loads_that_many_batches(tiny_world, monkeypatch):
    for key, path in list(config.DEMO_PATHS.items()):
        monkeypatch.setitem(config.DEMO_PATHS, key, tiny_world / path.relative_to(config.DEMO_DIR))
    monkeypatch.setattr(config, "DEMO_DIR", tiny_world)
    cfg = TrainConfig(dataset="demo", split="train", batch_size=8, steps_per_epoch=3, workers=0, crop_size=32)
    data = load_data(ModelConfig(word_dim=64), cfg, RunOptions(out=Path("unused")),
                     distributed.Context(0, 1, torch.device("cpu")))
    data.sampler.set_epoch(0)
    assert data.steps_per_epoch == 3 and [len(ids) for _, _, ids in data.loader] == [8, 8, 8]


def hardest_triplet_sum(scores: torch.Tensor, margin: float) -> float:
    """Eq. 7 by loops: for each pair, the hinge on its hardest other caption and its hardest other image."""
    total, size = 0.0, len(scores)
    for i in range(size):
        caption = max(scores[i, j].item() for j in range(size) if j != i)
        image = max(scores[j, i].item() for j in range(size) if j != i)
        total += max(0.0, margin - scores[i, i].item() + caption) + max(0.0, margin - scores[i, i].item() + image)
    return total


def test_loss_reduction_mean_is_the_sum_over_the_batch_size():
    torch.manual_seed(0)
    scores = torch.randn(5, 5) * 0.3
    summed = hardest_triplet_sum(scores, 0.1)
    assert summed > 0
    mean = epoch_loss(TrainConfig(loss="hard", margin=0.1, loss_reduction="mean"), 0)(scores)
    assert mean.item() == pytest.approx(summed / 5, rel=1e-6)
    assert epoch_loss(TrainConfig(loss="hard", margin=0.1), 0)(scores).item() == pytest.approx(summed, rel=1e-6)
    npair = [epoch_loss(TrainConfig(loss="npair", loss_reduction=kind), 0)(scores).item() for kind in ("sum", "mean")]
    assert npair[1] == pytest.approx(npair[0] / 5, rel=1e-6)


def test_resize_only_squashes_the_whole_image_to_a_square_with_no_crop_or_flip():
    # 100 x 50: red top-left, green top-right, blue bottom-left, white bottom-right quadrants
    image = Image.new("RGB", (100, 50))
    for box, colour in [((0, 0, 50, 25), (255, 0, 0)), ((50, 0, 100, 25), (0, 255, 0)),
                        ((0, 25, 50, 50), (0, 0, 255)), ((50, 25, 100, 50), (255, 255, 255))]:
        image.paste(colour, box)
    transform = train_transform(TrainConfig(crop_size=32, resize_only=True, flip=False))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for _ in range(5):  # nothing random
        pixels = transform(image) * std.view(3, 1, 1) + mean.view(3, 1, 1)
        assert pixels.shape == (3, 32, 32)
        # each quadrant fills a 16 x 16 quarter of the square: the whole image is there, left stays left
        for (row, col), colour in [((8, 8), (1, 0, 0)), ((8, 24), (0, 1, 0)), ((24, 8), (0, 0, 1)),
                                   ((24, 24), (1, 1, 1)), ((0, 0), (1, 0, 0)), ((31, 31), (1, 1, 1))]:
            assert pixels[:, row, col].tolist() == pytest.approx(colour, abs=1e-5)


SENTENCES = {"101": ["[/EN#1/people A man] with [/EN#2/bodyparts pierced ears] .", "[/EN#1/people Someone] smiles"],
             "102": ["Two dogs run on [/EN#3/scene the grass] ."]}


@pytest.fixture
def entities(tmp_path, monkeypatch) -> Path:
    """A Flickr30K Entities folder (train 101, 102; test 101, 104) and the image folder."""
    root, images = tmp_path / "entities", tmp_path / "images"
    (root / "Sentences").mkdir(parents=True)
    images.mkdir()
    for image_id, lines in SENTENCES.items():
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    for image_id in ("101", "102", "103", "104"):
        Image.new("RGB", (40, 30)).save(images / f"{image_id}.jpg")
    (root / "train.txt").write_text("101\n102\n")
    (root / "test.txt").write_text("101\n104\n")
    monkeypatch.setenv("DSVE_FLICKR_ENTITIES", str(root))
    monkeypatch.setenv("DSVE_FLICKR_IMAGES", str(images))
    return tmp_path


def test_training_records_of_the_entities_split_files_have_plain_captions(entities):
    records = load_records("flickr30k_entities", "train")
    images = entities / "images"
    assert records == [Record(images / "101.jpg", ["A man with pierced ears .", "Someone smiles"], 101),
                       Record(images / "102.jpg", ["Two dogs run on the grass ."], 102)]


def write_karpathy(folder: Path, splits: dict[str, str]) -> Path:
    entries = [{"filename": f"{image_id}.jpg", "imgid": int(image_id), "split": split,
                "sentences": [{"raw": "a photo of something"}]} for image_id, split in splits.items()]
    path = folder / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def test_training_on_flickr30k_with_entities_test_images_is_refused_unless_allowed(entities, tiny_world,
                                                                                   monkeypatch, capsys):
    karpathy = write_karpathy(entities, {"101": "train", "103": "train", "102": "val"})
    monkeypatch.setenv("DSVE_FLICKR_KARPATHY", str(karpathy))
    args = ["--preset", "demo", "--dataset", "flickr30k", "--split", "train", "--out", entities / "run",
            "--words", tiny_world / "words" / "demo_word2vec.bin", "--workers", "0", "--no-progress",
            "--device", "cpu", "--set", "train.batch_size=2", "--set", "train.crop_size=32", "--epochs", "1"]
    assert run_in_process("train.py", args, tiny_world, monkeypatch) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "1 of its training images" in error and "e.g. 101" in error
    assert str(entities / "entities" / "test.txt") in error and "train.allow_test_overlap=true" in error
    allowed = TrainConfig(dataset="flickr30k", split="train", batch_size=2, crop_size=32, workers=0,
                          allow_test_overlap=True)
    data = load_data(ModelConfig(word_dim=64), allowed, RunOptions(out=entities / "run", words=args[9]),
                     distributed.Context(0, 1, torch.device("cpu")))
    assert [record.image.name for record in data.train_records] == ["101.jpg", "103.jpg"]
    with pytest.raises(UserError, match="101"):
        check_test_overlap(["103", "101"], "flickr30k")
    check_test_overlap(["103", "102"], "flickr30k")  # no test image: nothing to refuse
    (entities / "entities" / "test.txt").unlink()
    check_test_overlap(["101"], "flickr30k")  # no test split file configured: nothing to check against


def test_training_on_images_of_the_validation_split_is_refused_unless_allowed(entities, tiny_world):
    (entities / "entities" / "val.txt").write_text("102\n")  # also in train.txt
    words = RunOptions(out=entities / "run", words=tiny_world / "words" / "demo_word2vec.bin")
    cfg = TrainConfig(dataset="flickr30k_entities", split="train", val_split="val", batch_size=2, crop_size=32,
                      workers=0)
    context = distributed.Context(0, 1, torch.device("cpu"))
    with pytest.raises(UserError) as refused:
        load_data(ModelConfig(word_dim=64), cfg, words, context)
    message = str(refused.value)
    assert "1 training images of split 'train' are in the validation split 'val'" in message
    assert str(entities / "images" / "102.jpg") in message and "train.allow_test_overlap=true" in message
    cfg.allow_test_overlap = True
    assert len(load_data(ModelConfig(word_dim=64), cfg, words, context).val_records) == 1


@pytest.mark.slow
def test_a_run_of_drawn_batches_stopped_mid_epoch_resumes_exactly(tiny_world, tmp_path, monkeypatch):
    from misc.store import checkpoint
    from misc.train import run as training
    from tests.conftest import TINY_MODEL
    args = ["--preset", "demo", "--epochs", "1", *TINY_MODEL, "--limit", "16", "--set", "train.steps_per_epoch=3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    calls, epoch_loss_of = [], training.epoch_loss

    def counted(*config_args):
        loss_fn = epoch_loss_of(*config_args)

        def wrapped(scores, ids=None):
            calls.append(len(scores))
            if len(calls) == 5:  # the stopped run's step 2 of 3 (after the straight run's 3): pre-empted
                signal.raise_signal(signal.SIGTERM)
            return loss_fn(scores, ids=ids)
        return wrapped

    monkeypatch.setattr(training, "epoch_loss", counted)
    assert run_in_process("train.py", [*args, "--out", straight], tiny_world, monkeypatch) == 0
    assert calls == [40, 40, 40]  # 3 batches of 8 of the 16 images, all 5 captions of each (group_captions)
    assert run_in_process("train.py", [*args, "--out", stopped], tiny_world, monkeypatch) == 128 + signal.SIGTERM
    assert checkpoint.load(stopped / checkpoint.LAST)["step"] == 2
    assert run_in_process("train.py", ["--resume", stopped / checkpoint.LAST, *TINY_MODEL, "--limit", "16"],
                          tiny_world, monkeypatch) == 0
    assert len(calls) == 6  # the resumed run trains the last step only
    resumed, reference = checkpoint.load(stopped / checkpoint.LAST), checkpoint.load(straight / checkpoint.LAST)
    assert resumed["metrics"]["history"][0]["loss"] == pytest.approx(reference["metrics"]["history"][0]["loss"],
                                                                     rel=1e-6)
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
