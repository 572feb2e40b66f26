"""Search of extracted collections: loading them, exact top-k by chunked matrix products, or a faiss index
(:mod:`misc.collections.index`); dropping near-duplicate results; the result entries every front end returns."""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from misc.errors import UserError, first_line
from misc.store.arrays import TextColumn, npz_array, npz_names


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


@dataclass
class Searcher:
    """How a collection is searched: ``method`` "exact" or "faiss" (an index chosen for ``budget`` bytes or made by
    ``factory``), ``value`` the nprobe / efSearch (default: the saved one), ``rerank`` the candidates scored
    again exactly, ``text_queries`` what gives the text queries a new index's report measures too."""

    collection: Collection
    method: str = "exact"
    budget: int | None = None
    factory: str | None = None
    value: int | None = None
    rerank: int | None = None
    text_queries: Callable[[], np.ndarray | None] | None = None
    index: Any = None
    built: bool = False

    def prepare(self) -> None:
        """Load or build the faiss index now (a server does it before it listens, not on its first query)."""
        if self.method == "faiss" and self.index is None:
            from misc.collections.index import load_or_build_index

            self.index, self.built = load_or_build_index(self.collection, self.budget, self.factory, self.rerank,
                                                         text_queries=self.text_queries)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Scores and rows (Q, k') best first (-1 rows: not found by an approximate index), and how they were
        found."""
        if self.method == "exact":
            scores, rows = exact_search(queries, self.collection.features, k)
            return scores, rows, {"type": "exact"}
        from misc.collections import index

        self.prepare()
        scores, rows = index.index_search(self.index, queries, k, self.value, self.rerank, self.collection.features)
        info: dict[str, Any] = {"type": f"faiss {index.describe(self.index)}", "built": self.built}
        name = index.search_parameter(self.index)
        if name:
            info[name] = index.current_value(self.index)
        if self.rerank:
            info["rerank"] = self.rerank
        return scores, rows, info


def dedup(rows: np.ndarray, features: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """The first ``k`` of ranked ``rows`` (-1 ignored) whose vector has cosine < ``threshold`` with every kept
    higher-ranked one (the rows are unit vectors, so the cosine is their inner product)."""
    kept: list[int] = []
    kept_vectors = np.empty((0, features.shape[1]), dtype=np.float32)
    for row in rows[rows >= 0]:
        vector = np.asarray(features[row], dtype=np.float32)
        if not kept or float(np.max(kept_vectors @ vector)) < threshold:
            kept.append(int(row))
            kept_vectors = np.vstack([kept_vectors, vector])
            if len(kept) == k:
                break
    return np.array(kept, dtype=np.int64)


def stored_row(images: Collection, query: str) -> int | None:
    """The row of ``images`` that ``query`` names: a row number, a stored path (relative to the extracted folder),
    or a path from here to a file of the extracted folder (``photos/cat.jpg`` for the stored ``cat.jpg``); None
    if it names none of them."""
    if query.isdigit():
        if int(query) >= len(images.features):
            raise UserError(f"--image {query}: {images.path} has rows 0 to {len(images.features) - 1}")
        return int(query)
    names = [query]
    folder = images.config.get("folder")
    if folder and Path(query).exists() and Path(query).resolve().is_relative_to(Path(folder)):
        names.append(Path(query).resolve().relative_to(Path(folder)).as_posix())
    for name in names:
        found = np.flatnonzero(images.labels == name)
        if len(found):
            return int(found[0])
    return None


def result_entry(collection: Collection, rank: int, score: float, row: int) -> dict[str, Any]:
    """One result: its rank, cosine score, row (its id) and what it is (image path, or text line and number)."""
    entry: dict[str, Any] = {"rank": rank, "score": round(float(score), 6), "row": row}
    if collection.kind == "image":
        entry["path"] = str(collection.labels[row])
    else:
        entry["line_number"] = int(collection.line_numbers[row])
        entry["line"] = str(collection.labels[row])
    return entry


def print_results(collection: Collection, results: list[dict[str, Any]], info: dict[str, Any],
                  stream: TextIO) -> None:
    """Human summary: the ranked results of every query."""
    nouns = "images" if collection.kind == "image" else "lines"
    for result in results:
        print(f'{result["type"]} {result["query"]!r} -> top {len(result["results"])} of {len(collection.features)} '
              f'{nouns} ({info["type"]}):', file=stream)
        for entry in result["results"]:
            what = entry["path"] if collection.kind == "image" else f'line {entry["line_number"]}: {entry["line"]}'
            where = f'  peak {entry["localization"]["peak"]}' if "localization" in entry else ""
            print(f'{entry["rank"]:4d}  {entry["score"]:.4f}  {what}{where}', file=stream)
