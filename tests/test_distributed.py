"""Two CPU processes (gloo) with the global-batch loss match one process on the same global batch, for both
systems."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from misc.store import checkpoint
from misc.config import TrainConfig
from models.config import ModelConfig
from misc.train.loop import batch_scores
from misc.train.losses import build_loss
from misc.train.schedule import build_optimizer, enter_stage
from models.joint import build_model
from tests.conftest import ROOT, TINY_MODEL

GLOBAL_BATCH = 8
# The trunk is frozen in this stage and kept in eval mode (batch-norm statistics fixed), and dropout is off, so one
# process and two processes compute the same function; DSVE's projection and SRU train, the matchmap's 3x3 conv
# head and LSTM (its batch norm kept in eval mode too: batch statistics are per process).
pytestmark = pytest.mark.slow  # torchrun and gloo process groups

MODELS = {"dsve": ModelConfig(trunk="resnet18", maps_dim=16, embed_dim=16, word_dim=8, sru_layers=2,
                              image_dropout=0.0, text_dropout=0.0, rnn_dropout=0.0, weldon_k=2),
          "matchmap": ModelConfig(arch="matchmap", trunk="resnet18", trunk_cut="layer2", region_dim=16,
                                  lstm_hidden=16, word_dim=8, score="max_img")}
LOSSES = {"dsve": "hard", "matchmap": "npair"}
TRAIN = TrainConfig(text_from_epoch=0, trunk_from_epoch=5, lr=1e-3, frozen_mode="eval")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # float32 sums taken in a different order


def global_batch() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator)
    words = torch.randn(GLOBAL_BATCH, 5, 8, generator=generator)
    lengths = torch.tensor([5, 3, 4, 1, 3, 2, 3, 1])
    ids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])  # pairs 3 and 4 share an image
    return images, words, lengths, ids


def one_step(rank: int, world_size: int, arch: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = build_model(MODELS[arch])
    enter_stage(model, 0, TRAIN)
    if arch == "matchmap":
        model.image.head[1].eval()
    optimizer = build_optimizer(model, TRAIN)
    images, words, lengths, ids = (t.chunk(world_size)[rank] for t in global_batch())
    # the matchmap's word features of a process are as long as its longest caption: rank 1's are shorter
    words = words[:, :int(lengths.max())]
    network = DistributedDataParallel(model) if world_size > 1 else model
    image_out, text_out = network(images, words, lengths)
    scores, pair_ids = batch_scores(model, image_out, text_out, lengths, ids, global_batch=world_size > 1)
    loss = build_loss(LOSSES[arch], 0.2)(scores, ids=pair_ids)
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return {"loss": loss.detach(), "grads": grads, "params": {n: p.detach().clone() for n, p in
                                                              model.named_parameters()}}


def worker(rank: int, world_size: int, port: int, out: str, arch: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = one_step(rank, world_size, arch)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("arch", ["dsve", "matchmap"])
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path: Path, arch: str):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, free_port(), str(out), arch), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    single = one_step(0, 1, arch)
    torch.testing.assert_close(distributed["loss"], single["loss"], **TOLERANCE)
    assert single["loss"] > 0
    assert distributed["grads"].keys() == single["grads"].keys()
    assert any(name.startswith("text.") for name in single["grads"])
    assert not any(name.startswith("image.trunk") for name in single["grads"])
    for name, grad in single["grads"].items():
        torch.testing.assert_close(distributed["grads"][name], grad, **TOLERANCE, msg=name)
    for name, value in single["params"].items():
        torch.testing.assert_close(distributed["params"][name], value, **TOLERANCE, msg=name)


def test_torchrun_trains_and_resumes_with_rank_zero_checkpoints(tiny_world: Path, tmp_path: Path):
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]
    flags = ["--out", str(tmp_path), *map(str, TINY_MODEL)]
    environment = {**os.environ, "DSVE_DEMO_DIR": str(tiny_world), "OMP_NUM_THREADS": "1"}

    def launch(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*torchrun, str(ROOT / "train.py"), *args, *flags], cwd=ROOT, env=environment,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    first = launch("--preset", "demo", "--epochs", "1")
    assert "2 process(es)" in first.stderr
    assert first.stderr.count("epoch 0:") == 1  # only rank 0 reports
    assert "unwaited collective" not in first.stderr  # every gathered output is waited for, used or not
    launch("--resume", str(tmp_path / "last.pth.tar"), "--epochs", "2")
    state = checkpoint.load(tmp_path / "last.pth.tar")
    assert state["epoch"] == 2 and [h["epoch"] for h in state["metrics"]["history"]] == [0, 1]
