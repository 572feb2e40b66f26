"""A sharded extraction run: this rank's shards not done yet, each stored by :class:`ShardFolder` when complete
(:func:`run_shards`, for images and texts alike). Images (eq. 1) are decoded by DataLoader workers that split the
rank's shards and embedded in batches that never straddle two shards (:func:`extract_shards`); texts are embedded
shard by shard (:func:`misc.collections.texts.extract_text_shards`).

Distribution is static: under ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``) rank ``r`` of
``W`` takes the shards ``n`` with ``n % W == r``. Ranks never talk to each other, so uneven shards cannot hang a
run, and a shard's batches are the same whichever rank embeds it: vectors do not depend on the world size.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from misc.collections.extraction import Timing, embed_image_batches
from misc.collections.shards import LAYOUT_VERSION, ShardFolder, ShardRows
from misc.collections.sources import Shard, Skip, read_shard
from misc.data.datasets import eval_transform
from misc.data.images import decode_image, failure_reason
from misc.errors import UserError
from models.visual import ImageEncoder

log = logging.getLogger(__name__)
PROTOCOL = "resize"  # eval_transform's protocol: size x size, ImageNet mean and std


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks, from ``RANK`` and ``WORLD_SIZE`` (0 and 1 when unset)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be whole numbers (torchrun sets them)") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return rank, world


def rank_device(device: str) -> str:
    """The device of this rank: under torchrun on a machine with several GPUs, ``auto`` and ``cuda`` mean the
    GPU of the rank's ``LOCAL_RANK`` (one process a GPU); anything else is used as given."""
    if device in ("auto", "cuda") and "LOCAL_RANK" in os.environ and torch.cuda.device_count() > 1:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


class Numbered(Protocol):
    """What the runner needs of a shard: its number, and what the manifest records of it."""

    number: int

    def describe(self) -> dict[str, object]: ...


def run_manifest(source: str, shards: list[Numbered], record: dict[str, Any], dim: int, dtype: str,
                 kind: str = "image", protocol: str = PROTOCOL) -> dict[str, Any]:
    """The manifest of a sharded run (see :data:`misc.collections.shards.CHECKED`)."""
    return {"version": LAYOUT_VERSION, "kind": kind, "source": source, "shards": [shard.describe() for shard in shards],
            "protocol": protocol, "dim": dim, "dtype": dtype, **record}


@dataclass
class ShardBatch:
    """Decoded images of one batch of one shard, as :func:`embed_image_batches` takes them."""

    shard: int
    indices: torch.Tensor  # (B,) positions in the batch
    images: torch.Tensor  # (B, 3, S, S); (0,) when empty
    samples: list[tuple[str, str, str, str | None]]  # (key, source, sha1, caption) per image
    skipped: list[tuple[str, str]]  # samples of the shard given up since the previous batch
    last: bool  # the shard's final batch (possibly empty)

    def pin_memory(self) -> ShardBatch:
        """Called by the DataLoader (``pin_memory=True``) for faster copies to a GPU."""
        return ShardBatch(self.shard, self.indices, self.images.pin_memory(), self.samples, self.skipped, self.last)


class ShardImages(IterableDataset):
    """Batches of a list of shards; DataLoader worker ``i`` of ``n`` reads the shards ``i, i + n, ...``, so each
    shard is decoded in one worker, in its order. Decoding failures are reported skips, never an exception."""

    def __init__(self, shards: list[Shard], folder: Path | None, size: int, batch_size: int) -> None:
        self.shards, self.folder, self.size, self.batch_size = shards, folder, size, batch_size

    def __iter__(self) -> Iterator[ShardBatch]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        transform = eval_transform(self.size, PROTOCOL)
        for shard in mine:
            images: list[torch.Tensor] = []
            samples: list[tuple[str, str, str, str | None]] = []
            skipped: list[tuple[str, str]] = []
            for item in read_shard(shard, self.folder):
                if isinstance(item, Skip):
                    skipped.append((item.where, item.reason))
                    continue
                try:
                    images.append(transform(decode_image(item.data, self.size)))
                except Exception as error:  # any failure of one user image is reported, never fatal to the run
                    skipped.append((item.source, failure_reason(error)))
                    continue
                samples.append((item.key, item.source, hashlib.sha1(item.data).hexdigest(), item.caption))
                if len(images) == self.batch_size:
                    yield _batch(shard.number, images, samples, skipped, last=False)
                    images, samples, skipped = [], [], []
            yield _batch(shard.number, images, samples, skipped, last=True)


def _batch(shard: int, images: list[torch.Tensor], samples: list, skipped: list, last: bool) -> ShardBatch:
    stacked = torch.stack(images) if images else torch.empty(0)
    return ShardBatch(shard, torch.arange(len(images)), stacked, samples, skipped, last)


def _unbatched(item: ShardBatch) -> ShardBatch:
    """The DataLoader's collate function: the dataset already yields whole batches."""
    return item


@dataclass
class ShardRun:
    """What one rank's run did."""

    shards: int  # shards of this rank
    resumed: int  # of them, found done and not recomputed
    rows: int = 0  # vectors written now
    skipped: list[tuple[str, str]] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)


def run_shards(shards: list[Numbered], store: ShardFolder,
               embed: Callable[[list[Any]], Iterator[tuple[int, ShardRows]]], dtype: str, rank: int = 0,
               world: int = 1) -> ShardRun:
    """Give ``embed`` this rank's shards that are not done yet (shard ``n`` belongs to rank ``n % world``) and
    store each shard it yields, complete, into ``store`` (opened by the caller)."""
    mine = [shard for shard in shards if shard.number % world == rank]
    todo = [shard for shard in mine if not store.is_done(shard.number)]
    run = ShardRun(len(mine), len(mine) - len(todo))
    if run.resumed:
        log.info("rank %d: %d of its %d shards already done", rank, run.resumed, len(mine))
    by_number = {shard.number: shard for shard in todo}
    for number, rows in embed(todo):
        store.write(number, rows, dtype, by_number[number].describe())
        run.rows += len(rows.keys)
        run.skipped += rows.skipped
    return run


def extract_shards(encoder: ImageEncoder, shards: list[Shard], folder: Path | None, store: ShardFolder, *,
                   size: int, dtype: str, device: torch.device, amp: str | None = None, batch_size: int = 32,
                   workers: int = 2, rank: int = 0, world: int = 1, progress: bool = True) -> ShardRun:
    """Embed this rank's image shards that are not done yet into ``store`` (opened by the caller)."""
    timing = Timing()

    def embed(todo: list[Shard]) -> Iterator[tuple[int, ShardRows]]:
        loader = DataLoader(ShardImages(todo, folder, size, batch_size), batch_size=None, collate_fn=_unbatched,
                            num_workers=min(workers, len(todo)), pin_memory=device.type == "cuda")
        pending: dict[int, dict[str, list]] = {}
        for batch, features, _ in embed_image_batches(encoder, loader, device, amp, False, timing, progress):
            parts = pending.setdefault(batch.shard, {"features": [], "samples": [], "skipped": []})
            parts["features"].append(features)
            parts["samples"] += batch.samples
            parts["skipped"] += batch.skipped
            if batch.last:
                del pending[batch.shard]
                columns = [list(column) for column in zip(*parts["samples"])] or [[], [], [], []]
                keys, sources, sha1, captions = columns
                yield batch.shard, ShardRows(np.concatenate(parts["features"]), keys, sources, sha1, captions,
                                             parts["skipped"])

    run = run_shards(shards, store, embed, dtype, rank, world)
    run.timing = timing
    return run
