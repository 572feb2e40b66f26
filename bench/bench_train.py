"""Training-step throughput (images/s): the demo preset and the paper model at 256x256, on 1 and 2 processes.

One step = forward of both paths (each image with its preset's captions per image), the preset's loss over the
global batch, backward, Adam. Inputs are random (images and word vectors), so data loading is not measured here
(see bench_extraction.py for the loader).
With 2 processes (gloo on the CPU, the same code path as torchrun) each process takes half of the global batch and
the embeddings are gathered with their gradients, as in train.py.

    python bench/bench_train.py            # demo preset and paper model, 1 and 2 processes
    python bench/bench_train.py --quick    # demo preset only
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from bench.common import machine  # noqa: E402
from misc.presets import preset  # noqa: E402
from misc.train.loop import batch_scores  # noqa: E402
from misc.train.losses import build_loss  # noqa: E402
from misc.train.schedule import build_optimizer, enter_stage  # noqa: E402
from models.joint import build_model  # noqa: E402

# (name, preset, image size, global batch, timed steps): the paper model is far too slow on a CPU for its batch of
# 160, so it runs a small batch; images/s is what compares.
CASES = [("demo preset", "demo", None, 64, 5), ("paper model", "paper", 256, 8, 2)]
WORDS = 12  # tokens per caption


def step_times(rank: int, world_size: int, name: str, steps: int, size: int | None, batch: int) -> list[float]:
    model_cfg, train_cfg = preset(name)
    size = size or train_cfg.crop_size
    torch.manual_seed(0)
    model = build_model(model_cfg)
    enter_stage(model, max(train_cfg.trunk_from_epoch, train_cfg.text_from_epoch), train_cfg)  # the costliest stage
    optimizer = build_optimizer(model, train_cfg)
    loss_fn = build_loss(train_cfg.loss, train_cfg.margin)
    network = DistributedDataParallel(model) if world_size > 1 else model
    local = batch // world_size
    per_image = train_cfg.captions_per_image if train_cfg.group_captions else 1  # captions encoded per image
    images = torch.randn(local, 3, size, size)
    words = torch.randn(local * per_image, WORDS, model_cfg.word_dim)
    lengths = torch.full((local * per_image,), WORDS)
    ids = (torch.arange(local) + rank * local).repeat_interleave(per_image)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        image_out, text_out = network(images, words, lengths)
        scores, pair_ids = batch_scores(model, image_out, text_out, lengths, ids, global_batch=world_size > 1)
        loss = loss_fn(scores, ids=pair_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def worker(rank: int, world_size: int, port: int, case: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _, name, size, batch, steps = case
        times = step_times(rank, world_size, name, steps, size, batch)
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def measure(case: tuple, processes: int) -> list[float]:
    label, name, size, batch, steps = case
    if processes == 1:
        return step_times(0, 1, name, steps, size, batch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.pt")
        mp.spawn(worker, args=(processes, port, case, out), nprocs=processes, join=True)
        return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="demo preset only")
    args = parser.parse_args()
    cases = CASES[:1] if args.quick else CASES
    print(f"machine: {machine()}")
    print(f"{'model':<14}{'size':>6}{'batch':>7}{'procs':>7}{'steps':>7}{'median s/step':>15}{'images/s':>10}")
    for case in cases:
        label, name, size, batch, steps = case
        for processes in (1, 2):
            times = measure(case, processes)
            median = statistics.median(times)
            shown = size or preset(name)[1].crop_size
            print(f"{label:<14}{shown:>6}{batch:>7}{processes:>7}{len(times):>7}{median:>15.2f}{batch / median:>10.1f}",
                  flush=True)
    print("2 processes share the same 2 cores here, so they show the cost of the gather and DDP, not a speed-up.")


if __name__ == "__main__":
    main()
