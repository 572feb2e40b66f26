"""Where the images of a sharded extraction come from: an image folder, a list file (one path a line, JSON-lines,
CSV or parquet, with optional captions) or webdataset tar shards; and how they are cut into shards, the unit of
work of :mod:`misc.collections.shards`.

A shard is one tar file, or ``per_shard`` consecutive files of the sorted folder (or of the list, in its order).
Reading a shard yields its samples in a fixed order, or the reason one was skipped: a bad member, a truncated tar
or a key seen twice never stops the run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import pyarrow.parquet as pq
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from misc.data.images import IMAGE_EXTENSIONS, failure_reason, list_images, read_list
from misc.errors import UserError

log = logging.getLogger(__name__)
CAPTION_EXTENSIONS = ("txt", "json")  # webdataset members read as the caption of their sample


@dataclass(frozen=True)
class Shard:
    """One unit of work: a tar file, or a run of files (relative to the source folder) with their captions."""

    number: int
    tar: Path | None = None
    files: tuple[str, ...] = ()
    captions: tuple[str | None, ...] = ()

    def describe(self) -> dict[str, object]:
        """What the manifest records of this shard: a change in it refuses a rerun."""
        if self.tar is not None:
            return {"tar": str(self.tar), "bytes": self.tar.stat().st_size}
        listed = json.dumps([self.files, self.captions], ensure_ascii=False).encode("utf-8", "surrogateescape")
        return {"files": len(self.files), "sha256": hashlib.sha256(listed).hexdigest()}


@dataclass(frozen=True)
class Sample:
    """A sample read from a shard: its key, where its image came from, the image's bytes and its caption."""

    key: str
    source: str  # a file path relative to the folder, or "TAR:MEMBER"
    data: bytes
    caption: str | None


@dataclass(frozen=True)
class Skip:
    """A sample, member or tail of a tar that could not be read, and why."""

    where: str
    reason: str


def expand_tars(pattern: str) -> list[Path]:
    """The files a brace pattern names (``shards/{000000..000009}.tar``), in its order; every one must exist.

    The count check catches a pattern that names more shards than were written (or copied)."""
    paths = [Path(name) for name in expand_urls(pattern)]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"{pattern} names {len(paths)} tar shards but {len(paths) - len(missing)} exist (first "
                        f"missing: {missing[0]}); fix the pattern or copy the missing shards")
    if len(set(paths)) != len(paths):
        raise UserError(f"{pattern} names a tar shard twice; each shard must appear once")
    return paths


def read_entries(list_file: Path, folder: Path) -> tuple[list[str], list[str | None]]:
    """Paths (relative to ``folder`` or absolute) and captions of a list file: ``.jsonl`` (objects with ``path``
    and optional ``caption``), ``.csv`` (a header with ``path`` and optional ``caption``), ``.parquet`` (columns
    ``path`` and optional ``caption``), anything else one path a line."""
    suffix = list_file.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".parquet"):
        files = read_list(list_file, folder)
        return files, [None] * len(files)
    try:
        if suffix == ".parquet":
            rows = pq.read_table(list_file).to_pylist()
        elif suffix == ".csv":
            with open(list_file, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            lines = list_file.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as error:  # pyarrow's and json's format errors are ValueErrors
        raise UserError(f"list file {list_file} could not be read ({failure_reason(error)})") from error
    if not all(isinstance(row, dict) and isinstance(row.get("path"), str) for row in rows):
        raise UserError(f"list file {list_file}: every row needs a 'path' (text); optional 'caption'")
    root = folder.resolve()
    files = [Path(row["path"]).resolve().relative_to(root).as_posix()
             if Path(row["path"]).is_absolute() and Path(row["path"]).resolve().is_relative_to(root)
             else row["path"] for row in rows]
    first: dict[str, int] = {}
    for number, file in enumerate(files, 1):
        if first.setdefault(file, number) != number:  # a key of the output must name one image
            raise UserError(f"list file {list_file}: row {number} repeats {file!r} (row {first[file]}); list each "
                            f"image once (give one several captions in text_features_extraction.py --tsv)")
    return files, [None if row.get("caption") is None else str(row["caption"]) for row in rows]


def file_shards(files: list[str], captions: list[str | None], per_shard: int) -> list[Shard]:
    """Consecutive runs of ``per_shard`` files: shard ``n`` always holds the same files for the same list."""
    return [Shard(number, files=tuple(files[start:start + per_shard]),
                  captions=tuple(captions[start:start + per_shard]))
            for number, start in enumerate(range(0, len(files), per_shard))]


def find_shards(data: str, list_file: Path | None, per_shard: int) -> tuple[list[Shard], Path | None]:
    """The shards of ``data`` (a folder, or a pattern of ``.tar`` files) and the folder image paths are relative
    to (None for tars)."""
    if data.endswith(".tar"):
        if list_file is not None:
            raise UserError("--list goes with an image folder, not with tar shards")
        return [Shard(number, tar=path) for number, path in enumerate(expand_tars(data))], None
    folder = Path(data)
    if list_file is not None:
        files, captions = read_entries(list_file, folder)
    else:
        files = list_images(folder)
        captions = [None] * len(files)
    return file_shards(files, captions, per_shard), folder


def read_shard(shard: Shard, folder: Path | None) -> Iterator[Sample | Skip]:
    """The samples of a shard in their stored order, and a :class:`Skip` for each that cannot be read."""
    if shard.tar is not None:
        yield from read_tar(shard.tar)
        return
    assert folder is not None
    for file, caption in zip(shard.files, shard.captions):
        try:
            yield Sample(file, file, (folder / file).read_bytes(), caption)
        except OSError as error:
            yield Skip(file, failure_reason(error))


def read_tar(path: Path) -> Iterator[Sample | Skip]:
    """The samples of a webdataset tar: members grouped by key (the member path up to the first dot of its file
    name, webdataset's rule), one image (jpg, png, webp...) and an optional ``txt``/``json`` caption each.

    webdataset's reader gives the members; the grouping is done here rather than by ``group_by_keys``, which
    silently splits a key that comes back later in the tar: here that is a reported duplicate. A truncated or
    corrupt tar ends the shard with a :class:`Skip` naming it; the samples before the damage are kept.
    """
    seen: set[str] = set()
    key, members = None, {}
    read = 0
    try:
        with open(path, "rb") as handle:
            for member in tar_file_iterator(handle):
                base, extension = base_plus_ext(member["fname"])
                if base is None:
                    yield Skip(f"{path}:{member['fname']}", "member name has no extension; not part of a sample")
                    continue
                if base != key:
                    if key is not None:
                        yield _sample(path, key, members, seen)
                    key, members = base, {}
                members[extension] = member["data"]
                read += 1
    except (tarfile.TarError, OSError, EOFError) as error:
        if key is not None:
            yield _sample(path, key, members, seen)
            key = None
        reason = failure_reason(error).split(" @ <")[0]  # webdataset appends the file object's repr
        yield Skip(str(path), f"truncated or corrupt tar after {read} members ({reason}); "
                              f"the samples before it are kept")
    if key is not None:
        yield _sample(path, key, members, seen)


def _sample(path: Path, key: str, members: dict[str, bytes], seen: set[str]) -> Sample | Skip:
    """The sample of one key's members, or why there is none."""
    where = f"{path}:{key}"
    if key in seen:
        return Skip(where, "duplicate key: its members are not together in the tar (only the first run is kept)")
    seen.add(key)
    by_type = {extension.rsplit(".", 1)[-1].lower(): extension for extension in members}  # "x.jpg" is a jpg
    images = [extension for kind, extension in by_type.items() if f".{kind}" in IMAGE_EXTENSIONS]
    if len(images) != 1:
        found = ", ".join(sorted(members))
        return Skip(where, f"expected one image member, found {len(images)} (members: {found})")
    text, record = (members.get(by_type.get(kind, "")) for kind in CAPTION_EXTENSIONS)
    return Sample(key, f"{path}:{key}.{images[0]}", members[images[0]], _caption(text, record))


def _caption(text: bytes | None, record: bytes | None) -> str | None:
    """The sample's caption: its ``txt`` member, or the ``caption`` (else ``text``) field of its ``json``."""
    if text is not None:
        return text.decode("utf-8", "replace").strip()
    if record is not None:
        try:
            record = json.loads(record)
        except ValueError:
            return None
        if isinstance(record, dict):
            value = record.get("caption", record.get("text"))
            return None if value is None else str(value)
    return None
