"""Search of extracted collections: exact top-k by chunked matrix products, or a faiss index (inner product on
unit vectors) saved next to the features with a fingerprint of them, rebuilt when stale."""
from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from misc.store.arrays import TextColumn, npz_array, npz_fingerprint, npz_names
from misc.errors import UserError, first_line
from misc.store.files import atomic_path, write_json

log = logging.getLogger(__name__)

FLAT_BELOW = 100_000  # collections smaller than this get an exact faiss index


@dataclass
class Collection:
    """A feature file to search: its rows memory-mapped, a label per row (image path or text line)."""

    path: Path
    features: np.ndarray  # (N, d) float32 unit rows, memory-mapped when stored uncompressed
    labels: np.ndarray | TextColumn  # (N,) image paths, or the text lines
    kind: str  # "image" or "text"
    config: dict[str, Any]
    line_numbers: np.ndarray | None  # (N,) for text collections


def load_collection(path: Path) -> Collection:
    """Open a feature file written by the image or text extraction; a file that is not one (unreadable, crafted,
    pickled objects inside, rows and labels that do not match) is a one-line :class:`UserError` naming it."""
    path = Path(path)
    if path.is_dir():  # the sharded layout of image_features_extraction.py -o FOLDER
        from misc.collections.shards import load_sharded

        return load_sharded(path)
    try:
        return _collection(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable feature file ({first_line(error)}); make it again with "
                        f"image_features_extraction.py or text_features_extraction.py") from error


def _collection(path: Path) -> Collection:
    names = npz_names(path)
    if "features" not in names or not names & {"paths", "lines_utf8"}:
        raise UserError(f"{path}: expected 'features' and 'paths' (image features) or 'lines_utf8' (text "
                        f"features, as text_features_extraction.py writes them)")
    kind = "image" if "paths" in names else "text"
    features = npz_array(path, "features", mmap=True)
    if features.ndim != 2 or features.dtype != np.float32:
        raise UserError(f"{path}: 'features' must be (N, d) float32, got {features.shape} {features.dtype}")
    config = json.loads(str(npz_array(path, "config"))) if "config" in names else {}
    numbers = npz_array(path, "line_numbers") if kind == "text" else None
    labels = npz_array(path, "paths") if kind == "image" else TextColumn(path, "lines")
    if len(labels) != len(features) or (numbers is not None and len(numbers) != len(features)):
        raise UserError(f"{path}: {len(features)} feature rows but {len(labels)} {kind} labels; the file was not "
                        f"written by the extraction commands, make it again")
    return Collection(path, features, labels, kind, config if isinstance(config, dict) else {}, numbers)


def exact_search(queries: np.ndarray, features: np.ndarray, k: int,
                 rows_per_step: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of every query (Q, d) against ``features`` (N, d), by blocks of rows so that
    memory stays (Q, rows_per_step); returns scores and row indices (Q, k), best first (ties: lower index)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(features))
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(features), rows_per_step):
        block = np.asarray(features[start:start + rows_per_step])
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + len(block)),
                                                          (len(queries), len(block)))], axis=1)
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
        best_scores, best_rows = scores, rows
    order = np.lexsort((best_rows, -best_scores), axis=1)
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)


def default_nlist(count: int) -> int:
    """Inverted lists for ``count`` vectors: 1 (an exact flat index) below :data:`FLAT_BELOW`, else sqrt(N).

    sqrt(N) keeps k-means training (on 64 points per list) and list assignment affordable on a CPU; faiss
    suggests 4-16 sqrt(N) for the fastest queries at the billion scale.
    """
    return 1 if count < FLAT_BELOW else int(round(math.sqrt(count)))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/16 of them (at least 8), e.g. 62 of 1000 for a million vectors.
    Recall rises and speed falls about linearly with nprobe; nprobe = nlist is exact (see bench/bench_search.py)."""
    return min(nlist, max(8, nlist // 16))


def build_index(features: np.ndarray, nlist: int | None = None, seed: int = 0,
                rows_per_step: int = 65536) -> Any:
    """A faiss inner-product index of unit rows (N, d): flat (exact) when ``nlist`` is 1, else IVF-flat trained
    on a seeded sample of 64 rows per list. Rows are added by blocks, so a memory-mapped matrix is never copied
    whole (the IVF-flat index itself holds a copy of the vectors: N x d x 4 bytes)."""
    count, dim = features.shape
    nlist = default_nlist(count) if nlist is None else nlist
    if nlist <= 1:
        index = faiss.IndexFlatIP(dim)
    else:
        if count < nlist:
            raise ValueError(f"{nlist} inverted lists need at least as many vectors, got {count}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(seed).choice(count, size=min(count, 64 * nlist), replace=False))
        index.train(np.ascontiguousarray(features[sample], dtype=np.float32))
    for start in range(0, count, rows_per_step):
        index.add(np.ascontiguousarray(features[start:start + rows_per_step], dtype=np.float32))
    return index


def index_files(features_path: Path) -> tuple[Path, Path]:
    """Where the faiss index of a feature file lives, and its sidecar (fingerprint of the features it indexes)."""
    features_path = Path(features_path)
    return (features_path.with_name(features_path.name + ".faiss"),
            features_path.with_name(features_path.name + ".faiss.json"))


def load_or_build_index(collection: Collection, nlist: int | None = None) -> tuple[Any, bool]:
    """The saved index of a collection when it indexes these very features (and ``nlist`` if given), else a new
    one, saved next to the features. Returns the index and whether it was built now."""
    index_path, sidecar = index_files(collection.path)
    if collection.path.is_dir():  # the sharded layout of image_features_extraction.py -o FOLDER
        from misc.collections.shards import sharded_fingerprint as fingerprint
    else:
        fingerprint = npz_fingerprint
    wanted = {"features": fingerprint(collection.path), "count": len(collection.features),
              "nlist": default_nlist(len(collection.features)) if nlist is None else nlist}
    if index_path.exists() and sidecar.exists():
        try:
            if json.loads(sidecar.read_text(encoding="utf-8")) == wanted:
                return faiss.read_index(str(index_path)), False
            log.info("index %s is stale or was built differently; rebuilding", index_path)
        except (ValueError, RuntimeError) as error:
            log.warning("unreadable index %s (%s); rebuilding", index_path, error)
    started = time.perf_counter()
    index = build_index(collection.features, wanted["nlist"])
    log.info("built %s index of %d vectors in %.1f s", type(index).__name__, index.ntotal,
             time.perf_counter() - started)
    try:
        with atomic_path(index_path) as temporary:
            faiss.write_index(index, str(temporary))
        write_json(sidecar, wanted)
    except (UserError, OSError, RuntimeError) as error:  # faiss reports a failed write as a RuntimeError
        log.warning("could not save the index to %s (%s); it is used for this search only, and built again next "
                    "time", index_path, str(error).strip().splitlines()[0])
    else:
        log.info("saved the index to %s", index_path)
    return index, True


def index_search(index: Any, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of a faiss index; an IVF index visits ``nprobe`` lists (default :func:`default_nprobe`).
    Rows a query could not fill (too few vectors in the visited lists) have index -1."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, nprobe or default_nprobe(index.nlist))
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return scores, rows.astype(np.int64)
