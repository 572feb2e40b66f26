"""torchrun set-up, and the global batch: both systems' outputs gathered from every process with their gradients,
so the score matrix, and the hardest negatives of eq. 7, cover the whole batch as in single-process training. Also
what lets a run stop and resume anywhere: the epoch's sample order from a position, and the stop signals clusters
send."""
from __future__ import annotations

import itertools
import os
import signal
import threading
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
from torch.utils.data import Dataset, DistributedSampler

from misc.errors import UserError


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank 0 of 1 outside torchrun."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> Context:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def gather_objects(value: Any, context: Context) -> list[Any]:
    """``value`` of every process, in rank order (``[value]`` outside torchrun)."""
    if not context.distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


class EpochSampler(DistributedSampler):
    """This process's share of an epoch's order, from any position: a run resumed after k batches sees the same
    later ones. With ``draws`` = 0, a shuffle of every item drawn from (seed, epoch) as torch's
    ``DistributedSampler`` draws it; with ``draws`` > 0, that many items drawn uniformly with replacement from a
    generator seeded by the pair (seed, epoch) (Das et al.'s code draws each batch so), dealt out over processes."""

    def __init__(self, dataset: Dataset, context: Context, seed: int, draws: int = 0) -> None:
        super().__init__(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start, self.draws = 0, draws

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch`` from its ``start``-th item of this process on."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.draws:
            # the pair itself seeds the generator (seed + epoch would give seed 1's epoch 0 seed 0's epoch 1)
            rng = np.random.default_rng([self.seed % 2**64, self.epoch])
            order = rng.integers(0, len(self.dataset), self.draws)[self.rank::self.num_replicas].tolist()
        else:
            order = super().__iter__()
        return itertools.islice(order, self.start, None)

    def __len__(self) -> int:
        return (self.draws // self.num_replicas if self.draws else super().__len__()) - self.start


class StopSignals:
    """Within ``with``: SIGTERM and SIGUSR1 (what clusters send before pre-empting a job) are recorded rather than
    obeyed, so that training writes a checkpoint at its next step and then exits; :meth:`received` agrees over
    processes. Outside the main thread (where Python cannot catch signals) nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, context: Context) -> None:
        self.context, self.signal, self.previous = context, 0, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.record) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def record(self, number: int, frame: object) -> None:
        self.signal = number

    def received(self) -> int:
        """The signal any process received (0: none); every process must call it at the same points."""
        if not self.context.distributed:
            return self.signal
        flag = torch.tensor([self.signal], device=self.context.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process in rank order; gradients flow back to each process's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    # the autograd form of all-gather: its backward reduce-scatters (sums) the gradients back to each process. Its
    # result is waited for here, not on first use: an output the loss never reads (DSVE's caption lengths) would
    # otherwise stay registered as unwaited, one per step, and be reported when the process ends.
    gathered = collectives.all_gather_single_autograd(tensor, gather_dim=0, group=dist.group.WORLD)
    return collectives.wait_tensor(gathered)


def pad_steps(words: torch.Tensor) -> torch.Tensor:
    """Word features (B, T, D) zero-padded to the longest caption of every process's batch, so that they gather;
    the matchmap's scores read real tokens only (:func:`models.matchmap.word_mask`)."""
    steps = torch.tensor([words.shape[1]], device=words.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    return torch.nn.functional.pad(words, (0, 0, 0, int(steps.item()) - words.shape[1]))


def global_outputs(image_out: torch.Tensor, text_out: torch.Tensor, lengths: torch.Tensor,
                   ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the score matrix of the global batch needs, gathered from every process in rank order: the image
    outputs (DSVE's embeddings, the matchmap's region grids), the text outputs (embeddings, or word features padded
    to one length), the caption lengths and the image ids.

    Every process then computes the same global loss L. The all-gather's backward sums the gradients that all
    processes send to each part, so each process's outputs receive world_size * dL/dx; DDP then averages
    parameter gradients over processes, which gives exactly dL/dtheta of single-process training.
    """
    if text_out.dim() == 3 and dist.is_initialized():
        text_out = pad_steps(text_out)
    return gather(image_out), gather(text_out), gather(lengths), gather(ids)
