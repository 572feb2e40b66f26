"""torchrun set-up, and the global batch: embeddings gathered from every process with their gradients, so the
hardest negatives of eq. 7 are mined over the whole batch as in single-process training."""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives

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


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process in rank order; gradients flow back to each process's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    # the autograd form of all-gather: its backward reduce-scatters (sums) the gradients back to each process
    return collectives.all_gather_single_autograd(tensor, gather_dim=0, group=dist.group.WORLD)


def global_loss(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a batch loss so that it sees the global batch.

    Every process computes the same global loss L. The all-gather's backward sums the gradients that all
    processes send to each part, so each process's embeddings receive world_size * dL/dx; DDP then averages
    parameter gradients over processes, which gives exactly dL/dtheta of single-process training.
    """

    def wrapped(images: torch.Tensor, captions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return loss_fn(gather(images), gather(captions), ids=gather(ids))

    return wrapped
