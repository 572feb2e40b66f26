"""The sharded layout of an image or text extraction: a folder with a manifest and, per shard, vectors, metadata
and a done record, each written to a temporary name and renamed.

    OUT/manifest.json              what every shard depends on: kind (image or text), the shard list, checkpoint
                                   sha256, preprocessing (size, protocol), dimension, dtype; a rerun with another
                                   manifest is refused
    OUT/emb/img/{shard:06d}.npy    images: (n, d) unit rows (eq. 1), float16 by default
    OUT/emb/txt/{shard:06d}.npy    texts: (n, d) unit rows (eq. 4)
    OUT/meta/{shard:06d}.parquet   a row per vector: id, shard, row, key, source, sha1 (of the image's or line's
                                   bytes), caption (a text's line), and for texts line (its 1-based line number)
    OUT/done/{shard:06d}.json      written last: counts, skipped samples with reasons, sha256 of the two files above

A shard counts as done only when its done record names files whose sha256 still match, so a kill loses only the
shards in flight. A row's id is ``shard * 2**32 + row``: it never changes when other shards are added or redone.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from misc.errors import UserError
from misc.store.files import atomic_path, file_sha256, write_json, writing

if TYPE_CHECKING:
    from misc.collections.search import Collection

log = logging.getLogger(__name__)
LAYOUT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
ROW_BITS = 32  # id = shard << ROW_BITS | row
# Manifest keys a rerun must match, and how a refusal names them.
CHECKED = {"version": "layout version", "kind": "kind of extraction", "source": "input", "shards": "shard list",
           "checkpoint_sha256": "checkpoint", "size": "image size", "protocol": "preprocessing",
           "word_vectors": "word vectors", "dim": "dimension", "dtype": "--dtype"}
UNSTATED = {"kind": "image"}  # what a manifest written before a key existed meant by leaving it out
FOLDERS = {"image": "img", "text": "txt"}  # emb/ sub-folder of each kind
META_SCHEMA = pa.schema([("id", pa.int64()), ("shard", pa.int32()), ("row", pa.int32()), ("key", pa.string()),
                         ("source", pa.string()), ("sha1", pa.string()), ("caption", pa.string())])
TEXT_META_SCHEMA = META_SCHEMA.append(pa.field("line", pa.int64()))


def is_sharded(out: Path | str) -> bool:
    """Whether ``-o`` asks for the sharded layout: any name but ``*.npz`` (the single-file output) is a folder."""
    return Path(out).suffix.lower() != ".npz"


def row_ids(shard: int, rows: int) -> np.ndarray:
    """Stable ids of the rows of a shard."""
    return (np.int64(shard) << ROW_BITS) + np.arange(rows, dtype=np.int64)


@dataclass
class ShardRows:
    """What one shard produced: unit vectors, a metadata row per vector, and the skipped samples."""

    features: np.ndarray  # (n, d) float32 unit rows
    keys: list[str]
    sources: list[str]
    sha1: list[str]
    captions: list[str | None]
    skipped: list[tuple[str, str]]  # (where, reason)
    lines: list[int] | None = None  # texts: the 1-based line number of each vector


class ShardFolder:
    """The output folder of a sharded extraction (see the module docstring).

    :meth:`open` takes the run's locks: the ranks of one run (same world size) share ``locks/world-W`` and each
    holds ``locks/rank-R-of-W`` alone, so a second run into the folder is refused whatever its world size."""

    def __init__(self, root: Path, kind: str = "image") -> None:
        self.root, self.kind = Path(root), kind
        self.locks: list[TextIO] = []

    def emb(self, shard: int) -> Path:
        return self.root / "emb" / FOLDERS[self.kind] / f"{shard:06d}.npy"

    def meta(self, shard: int) -> Path:
        return self.root / "meta" / f"{shard:06d}.parquet"

    def done(self, shard: int) -> Path:
        return self.root / "done" / f"{shard:06d}.json"

    def open(self, manifest: dict[str, Any], rank: int = 0, world: int = 1) -> bool:
        """Lock the folder for this rank and check (or write) the manifest; returns whether it was there."""
        self._lock(rank, world)
        try:
            path = self.root / "manifest.json"
            if not path.exists():
                write_json(path, manifest)  # every rank computes the same manifest: whichever writes it first wins
                return False
            check_manifest(path, json.loads(path.read_text(encoding="utf-8")), manifest)
            return True
        except BaseException:
            self.close()
            raise

    def _lock(self, rank: int, world: int) -> None:
        folder = self.root / "locks"
        with writing(self.root):
            folder.mkdir(parents=True, exist_ok=True)
        busy = f"another run is writing into {self.root}; let it finish, or stop it, then run again"
        self._take(folder / f"world-{world}", fcntl.LOCK_SH, busy)
        self._take(folder / f"rank-{rank}-of-{world}", fcntl.LOCK_EX, busy)
        for other in folder.glob("world-*"):  # a run with another world size holds its own shared lock
            if other.name != f"world-{world}":
                with open(other) as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        self.close()
                        raise UserError(busy) from None

    def _take(self, path: Path, mode: int, busy: str) -> None:
        with writing(path):
            handle = open(path, "a")  # noqa: SIM115 - held open for the whole run
        self.locks.append(handle)
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise UserError(busy) from None

    def close(self) -> None:
        """Release this rank's locks."""
        for handle in self.locks:
            handle.close()
        self.locks = []

    def is_done(self, shard: int) -> bool:
        """Whether the shard's done record exists and the files it names still have its checksums."""
        try:
            record = json.loads(self.done(shard).read_text(encoding="utf-8"))
            return (record["emb_sha256"] == file_sha256(self.emb(shard))
                    and record["meta_sha256"] == file_sha256(self.meta(shard)))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def write(self, shard: int, rows: ShardRows, dtype: str, source: dict[str, Any]) -> dict[str, Any]:
        """Store a shard: vectors, then metadata, then the done record that makes them count."""
        count, dim = rows.features.shape
        with atomic_path(self.emb(shard)) as temporary, open(temporary, "wb") as handle:
            np.save(handle, rows.features.astype(DTYPES[dtype]))
        columns = {"id": row_ids(shard, count), "shard": np.full(count, shard, np.int32),
                   "row": np.arange(count, dtype=np.int32), "key": rows.keys, "source": rows.sources,
                   "sha1": rows.sha1, "caption": rows.captions}
        if rows.lines is not None:
            columns["line"] = np.asarray(rows.lines, dtype=np.int64)
        table = pa.table(columns, schema=META_SCHEMA if rows.lines is None else TEXT_META_SCHEMA)
        with atomic_path(self.meta(shard)) as temporary:
            pq.write_table(table, temporary)
        record = {"shard": shard, "source": source, "rows": count, "dim": dim, "dtype": dtype,
                  "skipped": len(rows.skipped), "skipped_samples": [list(skip) for skip in rows.skipped],
                  "emb_sha256": file_sha256(self.emb(shard)), "meta_sha256": file_sha256(self.meta(shard))}
        write_json(self.done(shard), record)
        return record


def check_manifest(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse, in one line, a rerun whose manifest differs from the stored one in a :data:`CHECKED` key."""
    for key, what in CHECKED.items():
        if stored.get(key, UNSTATED.get(key)) == wanted.get(key, UNSTATED.get(key)):
            continue
        if key == "shards" and isinstance(stored.get(key), list):
            old, new = stored[key], wanted[key]
            first = next((n for n, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            detail = f"{len(old)} shards then, {len(new)} now; first difference at shard {first}"
        else:
            detail = f"{stored.get(key, UNSTATED.get(key))} then, {wanted.get(key, UNSTATED.get(key))} now"
        raise UserError(f"{path} was made with a different {what} ({detail}); write to another folder, or delete "
                        f"this one to start over")


def sharded_fingerprint(folder: Path) -> str:
    """A content fingerprint of a sharded extraction (as ``npz_fingerprint`` of an .npz, to tell a stale index):
    the manifest and the vectors' sha256 of every done record, read without touching the vectors."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "manifest.json").read_bytes())
    for record in sorted((folder / "done").glob("*.json")):
        digest.update(json.loads(record.read_text(encoding="utf-8"))["emb_sha256"].encode())
    return digest.hexdigest()


def stored_column(folder: Path, column: str) -> list[Any]:
    """One metadata column of every row of a sharded extraction, in row order (``key``, ``caption``, ...)."""
    folder = Path(folder)
    shards = len(json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["shards"])
    store = ShardFolder(folder)
    return [value for shard in range(shards)
            for value in pq.read_table(store.meta(shard), columns=[column])[column].to_pylist()]


def stored_captions(folder: Path) -> list[str]:
    """The non-empty captions of a sharded image extraction's rows (webdataset txt/json members, list captions)."""
    return [caption for caption in stored_column(folder, "caption") if caption and caption.strip()]


class ShardedRows:
    """The vectors of every shard as one read-only (N, d) float32 matrix: each shard's ``.npy`` is memory-mapped,
    and a slice or a list of rows reads only the shards it touches."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = [part for part in parts if len(part)]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        dim = parts[0].shape[1] if parts else 0
        self.shape = (int(self.starts[-1]), dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[0:len(self)].astype(dtype or np.float32, copy=False)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return self._rows(np.arange(len(self))[index])
        rows = np.asarray(index)
        if rows.ndim == 0:
            return self._rows(rows.reshape(1))[0]
        return self._rows(rows.astype(np.int64))

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        rows = np.where(rows < 0, rows + len(self), rows)
        parts = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(parts):
            chosen = parts == part
            out[chosen] = self.parts[part][rows[chosen] - self.starts[part]]
        return out


def load_sharded(folder: Path) -> Collection:
    """A sharded extraction as a :class:`~misc.collections.search.Collection` of images or texts: vectors
    memory-mapped shard by shard; labels the ``source`` of each image, or each text's line (with its line number).
    Every shard of the manifest must be done."""
    from misc.collections.search import Collection  # faiss loads only when a collection is searched

    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        kind = manifest.get("kind", UNSTATED["kind"])
        store = ShardFolder(folder, kind)
        shards = range(len(manifest["shards"]))
        missing = [shard for shard in shards if not store.done(shard).exists()]
        if missing:
            raise UserError(f"{folder}: {len(missing)} of {len(shards)} shards are not done (first: {missing[0]}); "
                            f"finish the extraction by running the same command again")
        parts = [np.load(store.emb(shard), mmap_mode="r") for shard in shards]
        columns = ["source"] if kind == "image" else ["caption", "line"]
        tables = [pq.read_table(store.meta(shard), columns=columns) for shard in shards]
        labels = np.array([value for table in tables for value in table[columns[0]].to_pylist()],
                          dtype=str if kind == "image" else object)  # a line keeps its trailing NULs
        numbers = (np.array([value for table in tables for value in table["line"].to_pylist()], dtype=np.int64)
                   if kind == "text" else None)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder}: not a readable sharded extraction ({error}); make it again with "
                        f"image_features_extraction.py or text_features_extraction.py") from error
    features = ShardedRows(parts)
    if len(labels) != len(features) or any(part.ndim != 2 or part.shape[1] != manifest["dim"] for part in parts):
        raise UserError(f"{folder}: {len(features)} vectors but {len(labels)} metadata rows, or vectors of another "
                        f"dimension than the manifest's {manifest['dim']}; make it again")
    config = {key: manifest.get(key) for key in ("checkpoint", "checkpoint_sha256", "model", "size", "folder",
                                                 "word_vectors", "data")}
    return Collection(folder, features, labels, kind, config, numbers)
