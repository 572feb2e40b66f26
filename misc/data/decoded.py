"""Dataset images decoded where a loop draws them, and the one rule for a file that fails there (issue 27).

A named dataset's images (COCO, Flickr30K, the demo world: 5000 to 123000 files) are only checked to exist before a
run; decoding them all ahead would cost as much as the evaluation. So a file that fails to decode (a JPEG cut short,
a file that is not an image) is found when it is drawn: :func:`try_decode` turns the failure into a reason, in the
DataLoader worker, never an exception; :class:`Undecodable` logs each such file once with the count so far and
lists it as the results record's ``unreadable_images`` says (:func:`misc.store.results.unreadable_images`). An
evaluation loop (:class:`EvalImages`) leaves the image out; training (:class:`misc.data.datasets.PairDataset`)
replaces it by the next one that decodes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from misc.data.images import decode_image, failure_reason
from misc.errors import UserError

log = logging.getLogger(__name__)

Unreadable = list[tuple[str, str]]  # images left out because they do not decode: (path, reason)
T = TypeVar("T")


def try_decode(path: Path) -> tuple[Image.Image | None, str | None]:
    """The image at ``path`` decoded (full scale, stored orientation: boxes and masks of annotated datasets are on
    the stored pixels) and None, or None and why it cannot be."""
    try:
        return decode_image(path, exif=False), None
    except Exception as error:  # any failure to decode one file means the same: that image cannot be used
        return None, failure_reason(error)


class Undecodable:
    """The images of a run that failed to decode, in the order met, each logged once (``what`` names the images,
    ``action`` what happens to one) with the count so far; ``known`` ones (e.g. a resumed run's) are listed without
    a new log line."""

    def __init__(self, what: str, action: str, known: Iterable[tuple[str, str]] = ()) -> None:
        self.what, self.action = what, action
        self.found: dict[str, str] = dict(known)

    def add(self, path: Path | str, reason: str) -> None:
        if str(path) in self.found:
            return
        self.found[str(path)] = reason
        log.warning("%s %s cannot be decoded (%s): %s (%d unreadable so far)", self.what, path, reason, self.action,
                    len(self.found))

    def merge(self, found: Iterable[tuple[str, str]]) -> None:
        """Also list ``found`` (path, reason), e.g. another process's, without a new log line."""
        for path, reason in found:
            self.found.setdefault(str(path), reason)

    def __contains__(self, path: Path | str) -> bool:
        return str(path) in self.found

    def __len__(self) -> int:
        return len(self.found)

    def listed(self) -> Unreadable:
        """(path, reason) of each, in the order met."""
        return list(self.found.items())

    def kept(self, items: Sequence[T], path_of: Callable[[T], Path | str]) -> list[T]:
        """The ``items`` whose image (``path_of(item)``) is not one of these."""
        return [item for item in items if str(path_of(item)) not in self.found]


class ImageDataset(Dataset):
    """Images only, for evaluation; item ``i`` is ``(i, image or None, reason or None)``: a file that fails to
    decode is a reason, never an exception in a worker."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        image, reason = try_decode(self.paths[index])
        return index, None if image is None else self.transform(image), reason


@dataclass
class ImageBatch:
    """The decoded images of a batch and the failures among its files."""

    indices: list[int]  # positions in the path list of the decoded images
    images: torch.Tensor  # (B, 3, S, S)
    failures: list[tuple[int, str]]  # (position, reason)

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader (``pin_memory=True``) for faster copies to a GPU."""
        return ImageBatch(self.indices, self.images.pin_memory(), self.failures)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    """Stack the decoded images, set the failures aside."""
    decoded = [(index, image) for index, image, _ in items if image is not None]
    return ImageBatch([index for index, _ in decoded],
                      torch.stack([image for _, image in decoded]) if decoded else torch.empty(0),
                      [(index, reason) for index, image, reason in items if image is None])


class EvalImages:
    """An evaluation loop's images, ``paths`` decoded batch by batch: iterating gives the batches of those that
    decode (:class:`ImageBatch`, never an empty one), the others go to ``undecodable`` and are left out of the
    loop; :meth:`kept` says which of the loop's items remain, :meth:`finish` says it in one line."""

    def __init__(self, paths: Sequence[Path], transform: Callable, batch_size: int, workers: int,
                 pin_memory: bool = False, progress: bool = True, undecodable: Undecodable | None = None) -> None:
        self.paths = list(paths)
        self.undecodable = undecodable if undecodable is not None else Undecodable("image", "left out")
        self.failed: set[int] = set()
        self.loader = DataLoader(ImageDataset(self.paths, transform), batch_size=batch_size, num_workers=workers,
                                 collate_fn=collate_images, pin_memory=pin_memory)
        self.progress = progress

    def __iter__(self) -> Iterator[ImageBatch]:
        for batch in tqdm(self.loader, desc="images", disable=not self.progress, leave=False, dynamic_ncols=True):
            for index, reason in batch.failures:
                self.failed.add(index)
                self.undecodable.add(self.paths[index], reason)
            if batch.indices:
                yield batch

    def kept(self, items: Sequence[T]) -> list[T]:
        """The ``items`` (one per path, in the same order) whose image decoded."""
        return [item for index, item in enumerate(items) if index not in self.failed]

    def unreadable(self) -> Unreadable:
        """(path, reason) of the images this loop left out, in path order."""
        return [(str(self.paths[i]), self.undecodable.found[str(self.paths[i])]) for i in sorted(self.failed)]

    def finish(self, consequence: str) -> Unreadable:
        """After the loop: one line with the count of images left out and ``consequence`` (what leaving one out
        means for the results); a one-line error when none decoded. Returns :meth:`unreadable`."""
        left_out = self.unreadable()
        if len(left_out) == len(self.paths) and self.paths:
            raise UserError(f"none of the {len(self.paths)} images decodes, e.g. {left_out[0][0]} ({left_out[0][1]})")
        if left_out:
            log.warning("%d of %d images cannot be decoded and were left out, e.g. %s (%s); %s", len(left_out),
                        len(self.paths), *left_out[0], consequence)
        return left_out


class Replacing:
    """A training loader of :class:`misc.data.datasets.PairCollate` batches, each image that its items replaced
    because it does not decode counted in ``undecodable`` (in this process, where a worker's count would be lost);
    yields (images, captions, image ids), what the training loop reads."""

    def __init__(self, loader: DataLoader, undecodable: Undecodable) -> None:
        self.loader, self.undecodable = loader, undecodable

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        for *batch, failed in self.loader:
            for path, reason in failed:
                self.undecodable.add(path, reason)
            yield tuple(batch)
