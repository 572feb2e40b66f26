"""Chunked, resumable image extraction, shared by ``image_features_extraction.py`` and ``search.py``.

Decoding errors become reported ``skipped`` entries, never an exception in a DataLoader worker. Results are flushed
chunk by chunk to ``OUT.npz.parts/`` (:class:`PartStore`), checked against a manifest on ``--resume``, and assembled
into ``OUT.npz`` (streamed, temporary file + rename) when every chunk is done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from misc.store.arrays import Streamed, npz_array, skipped_array, text_array, write_npz
from misc.store.files import write_json
from misc.store.locks import FolderLock
from misc.store.source import model_sha256
from misc.errors import UserError
from misc.data.datasets import eval_transform
from misc.devices import autocast
from misc.data.decoded import ImageBatch, collate_images
from misc.data.images import decode_image, failure_reason, printable, utf8_name
from models.visual import ImageEncoder

log = logging.getLogger(__name__)
PART_VERSION = 1
MAPS_DTYPE = np.float16  # G is only used for heatmaps (eq. 8); half precision halves the file


class ImageFiles(Dataset):
    """Images of a file list for extraction; item ``i`` is ``(i, image (3, S, S) or None, reason or None)``.

    Decoding errors are caught here, in the worker, and returned as a reason: a bad file never kills a worker.
    """

    def __init__(self, folder: Path, entries: list[str], size: int) -> None:
        self.folder, self.entries, self.size = Path(folder), entries, size
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        if not utf8_name(self.entries[index]):  # its path could not be stored as text in the output
            return index, None, "file name is not valid UTF-8; rename the file to embed it"
        try:
            return index, self.transform(decode_image(self.folder / self.entries[index], self.size)), None
        except Exception as error:  # any failure of one user file is reported, never fatal to the run
            return index, None, failure_reason(error)


# --------------------------------------------------------------------------- embedding loop

@dataclass
class Timing:
    """Where an extraction's time went: waiting for the loader vs computing, per batch."""

    images: int = 0
    seconds: float = 0.0
    wait: list[float] = field(default_factory=list)  # seconds per batch spent waiting for the loader
    compute: list[float] = field(default_factory=list)  # seconds per batch in the model (incl. copy back)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """Speed and the loader's share of the time, for the final log line: a large share means more
        ``--workers`` (or faster storage) would help, a small one that the model is the bottleneck."""
        waited = sum(self.wait)
        return (f"{self.images_per_s:.1f} images/s; {waited:.1f} s of {self.seconds:.1f} s waiting for the loader "
                f"({100 * waited / max(self.seconds, 1e-9):.0f}%)")


@torch.no_grad()
def embed_image_batches(encoder: ImageEncoder, loader: Iterable[ImageBatch], device: torch.device,
                        amp: str | None = None, with_maps: bool = False, timing: Timing | None = None,
                        progress: bool = True) -> Iterator[tuple[ImageBatch, np.ndarray, np.ndarray | None]]:
    """Yield every batch with its unit embeddings (B, d) float32 and, with ``with_maps``, its maps G
    (B, D', h, w) in :data:`MAPS_DTYPE` (eq. 1 and 3). Time spent by the consumer is not counted in ``timing``."""
    encoder.eval()
    timing = timing if timing is not None else Timing()
    embed_dim = encoder.proj.out_features
    layout = torch.channels_last if amp else torch.contiguous_format  # as misc.inference lays out the network
    start = tick = time.perf_counter()
    for batch in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        began = time.perf_counter()
        timing.wait.append(began - tick)
        maps = None
        if len(batch.indices):
            with autocast(device, amp):
                grids = encoder.feature_maps(batch.images.to(device, memory_format=layout, non_blocking=True))
                features = encoder.embed_maps(grids).float().cpu().numpy()  # (B, d)
            if with_maps:
                maps = grids.to(torch.float16).cpu().numpy()
        else:
            features = np.empty((0, embed_dim), dtype=np.float32)
        timing.compute.append(time.perf_counter() - began)
        timing.images += len(batch.indices)
        paused = time.perf_counter()
        yield batch, features, maps
        tick = time.perf_counter()
        start += tick - paused  # the consumer's time (writing parts) is not extraction time
    timing.seconds += time.perf_counter() - start


def map_side(size: int) -> int:
    """Side of the maps G for a ``size`` x ``size`` input: a ResNet halves it (rounding up) five times."""
    for _ in range(5):
        size = (size + 1) // 2
    return size


def maps_bytes(count: int, maps_dim: int, size: int) -> int:
    """Bytes the maps G of ``count`` images take in the output (:data:`MAPS_DTYPE`)."""
    return count * maps_dim * map_side(size) ** 2 * np.dtype(MAPS_DTYPE).itemsize


def log_skipped(skipped: list[tuple[str, str]], out: Path | str, shown: int = 20,
                listed: str = "the 'skipped' array of") -> None:
    """Warn about the first ``shown`` skipped items (where, why); all of them are in the output (``listed``)."""
    for where, reason in skipped[:shown]:
        log.warning("skipped %s: %s", where, reason)
    if len(skipped) > shown:
        log.warning("... and %d more, all listed in %s %s", len(skipped) - shown, listed, out)


# --------------------------------------------------------------------------- checkpoints and word vectors

def describe_checkpoint(path: Path, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a feature file records about the model that made it (stored as the JSON string ``config``)."""
    return {"checkpoint": str(path), "checkpoint_sha256": model_sha256(path), "model": state["config"]["model"],
            **extra}


# --------------------------------------------------------------------------- resumable image extraction

class PartStore:
    """The finished chunks of an extraction into ``OUT``: ``OUT.parts/manifest.json`` and ``part-NNNNNN.npz``.

    The manifest fingerprints what the results depend on (checkpoint bytes, image size, maps or not, the file
    list); a run only resumes parts whose manifest matches. Every file is written atomically. A run holds an
    exclusive lock on ``OUT.parts/lock`` from :meth:`start` to :meth:`close`, so a second process refuses to start.
    """

    CHECKED = {"checkpoint_sha256": "checkpoint", "size": "image size", "maps": "--maps setting",
               "files": "file list (number of files)", "files_sha256": "file list"}

    def __init__(self, out: Path) -> None:
        self.folder = Path(out).with_name(Path(out).name + ".parts")
        self.lock: FolderLock | None = None

    def start(self, manifest: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Open the store for a run; returns the manifest in force (a resumed run keeps its chunk size)."""
        path = self.folder / "manifest.json"
        if self.folder.exists() and not resume:
            raise UserError(f"{self.folder} holds an unfinished run; pass --resume to continue it, or delete it")
        self._lock()
        try:
            if resume and path.exists():
                stored = json.loads(path.read_text(encoding="utf-8"))
                for key, what in self.CHECKED.items():
                    if stored.get(key) != manifest[key]:
                        raise UserError(f"cannot resume {self.folder}: it was made with a different {what} "
                                          f"({stored.get(key)} vs {manifest[key]} now); delete it to start over")
                return stored
            if resume:
                log.info("nothing to resume in %s; starting", self.folder)
            write_json(path, manifest)
            return manifest
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        self.lock = FolderLock(self.folder, "let it finish, or stop it and run again with --resume").acquire()

    def close(self) -> None:
        """Release the run's lock (the parts stay for a later --resume)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def part(self, chunk: int) -> Path:
        return self.folder / f"part-{chunk:06d}.npz"

    def finished(self, chunks: int) -> list[int]:
        return [chunk for chunk in range(chunks) if self.part(chunk).exists()]

    def save(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        write_npz(self.part(chunk), arrays)

    def load(self, chunk: int, name: str) -> np.ndarray:
        return npz_array(self.part(chunk), name)

    def remove(self) -> None:
        """Delete the parts once the output is complete, and release the lock."""
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()
        self.close()


@dataclass
class Extraction:
    """What an image extraction produced."""

    count: int  # images embedded
    skipped: list[tuple[str, str]]  # (path, reason)
    resumed_chunks: int  # chunks found finished and not recomputed
    timing: Timing


def run_manifest(checkpoint_sha256: str, size: int, maps: bool, entries: list[str],
                 chunk_size: int) -> dict[str, Any]:
    """What the parts of a run depend on (see :attr:`PartStore.CHECKED`), and their chunk size."""
    return {"version": PART_VERSION, "checkpoint_sha256": checkpoint_sha256, "size": size, "maps": maps,
            "files": len(entries), "chunk_size": chunk_size,
            "files_sha256": hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()}


def chunk_batches(chunks: list[range], batch_size: int) -> list[list[int]]:
    """Batches of positions that never straddle two chunks, so every chunk can be flushed on its own."""
    return [list(chunk[i:i + batch_size]) for chunk in chunks for i in range(0, len(chunk), batch_size)]


def extract_images(encoder: ImageEncoder, folder: Path, entries: list[str], out: Path, size: int,
                   config_record: dict[str, Any], *, device: torch.device, amp: str | None = None,
                   batch_size: int = 32, workers: int = 2, chunk_size: int = 1000, maps: bool = False,
                   resume: bool = False, progress: bool = True) -> Extraction:
    """Embed every entry of ``entries`` (paths relative to ``folder``, or absolute) and write ``out``.

    ``out`` holds ``features`` (N, d) float32 unit rows, ``paths`` (N,), ``skipped`` (K, 2) (path, reason),
    ``config`` (JSON string: ``config_record``) and with ``maps`` the maps G (N, D', h, w) float16. Chunks of
    ``chunk_size`` entries are flushed to :class:`PartStore` as they finish; ``resume`` continues from them.
    """
    store = PartStore(out)
    manifest = run_manifest(config_record["checkpoint_sha256"], size, maps, entries, chunk_size)
    chunk_size = store.start(manifest, resume)["chunk_size"]
    try:
        chunks = [range(start, min(start + chunk_size, len(entries))) for start in range(0, len(entries), chunk_size)]
        done = set(store.finished(len(chunks)))
        if done:
            log.info("resuming: %d of %d chunks already done", len(done), len(chunks))
        batches = chunk_batches([chunk for number, chunk in enumerate(chunks) if number not in done], batch_size)
        loader = DataLoader(ImageFiles(folder, entries, size), batch_sampler=batches, num_workers=workers,
                            collate_fn=collate_images, pin_memory=device.type == "cuda")
        timing = Timing()
        pending: dict[str, list] = {"indices": [], "features": [], "maps": [], "failed": [], "reasons": []}
        seen = 0
        for batch, features, grids in embed_image_batches(encoder, loader, device, amp, maps, timing, progress):
            pending["indices"].append(np.asarray(batch.indices, dtype=np.int64))
            pending["features"].append(features)
            if grids is not None:
                pending["maps"].append(grids)
            pending["failed"] += [index for index, _ in batch.failures]
            pending["reasons"] += [reason for _, reason in batch.failures]
            seen += len(batch.indices) + len(batch.failures)
            number = (int(batch.indices[0]) if len(batch.indices) else batch.failures[0][0]) // chunk_size
            if seen == len(chunks[number]):
                store.save(number, _chunk_arrays(pending, maps))
                pending = {key: [] for key in pending}
                seen = 0
        count, skipped = _assemble(store, entries, len(chunks), out, config_record, encoder.proj.out_features, maps)
        store.remove()
    finally:
        store.close()
    return Extraction(count, skipped, len(done), timing)


def _chunk_arrays(pending: dict[str, list], maps: bool) -> dict[str, np.ndarray]:
    arrays = {"indices": np.concatenate(pending["indices"]).astype(np.int64),
              "features": np.concatenate(pending["features"]),
              "failed": np.array(pending["failed"], dtype=np.int64), "reasons": text_array(pending["reasons"])}
    if maps:
        arrays["maps"] = np.concatenate(pending["maps"]) if pending["maps"] else np.empty((0, 0, 0, 0), MAPS_DTYPE)
    return arrays


def _assemble(store: PartStore, entries: list[str], chunks: int, out: Path, config_record: dict[str, Any],
              embed_dim: int, maps: bool) -> tuple[int, list[tuple[str, str]]]:
    """Stream the parts into the final file; returns the number of images embedded and the skipped files."""
    indices = [store.load(chunk, "indices") for chunk in range(chunks)]
    filled = [chunk for chunk in range(chunks) if len(indices[chunk])]
    count = sum(len(i) for i in indices)
    skipped = [(printable(entries[index]), str(reason)) for chunk in range(chunks)
               for index, reason in zip(store.load(chunk, "failed"), store.load(chunk, "reasons"))]
    arrays: dict[str, np.ndarray | Streamed] = {
        "features": Streamed((count, embed_dim), np.float32,
                             lambda: (store.load(chunk, "features") for chunk in filled)),
        "paths": text_array([entries[index] for chunk in indices for index in chunk]),
        "skipped": skipped_array(skipped),
        "config": np.array(json.dumps(config_record)),
    }
    if maps:
        grid_shape = store.load(filled[0], "maps").shape[1:] if filled else (0, 0, 0)
        arrays["maps"] = Streamed((count, *grid_shape), MAPS_DTYPE,
                                  lambda: (store.load(chunk, "maps") for chunk in filled))
    write_npz(out, arrays)
    return count, skipped
