"""faiss indexes of extracted collections, chosen from a memory budget, with their recall on record.

An index is chosen among Flat (exact), HNSW, IVF-flat, IVF-SQfp16, IVF-SQ8 and OPQ+IVF+PQ by :func:`choose_factory`
(the first, in that order, whose estimated size fits the budget), made with ``faiss.index_factory`` on inner
products of unit rows, trained on a seeded random sample and filled by blocks. Every build is measured
(:func:`measure`) against exact search on held-out rows of the collection (and on text queries, the embedded
captions of an image collection that has them), and the report is kept with the index; the default nprobe (IVF)
or efSearch (HNSW) is the smallest whose 10-recall@10 reaches :data:`TARGET` for every set of queries.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from misc.errors import UserError
from misc.collections.shards import sharded_fingerprint
from misc.store.arrays import npz_fingerprint
from misc.store.files import atomic_path, write_json

if TYPE_CHECKING:
    from misc.collections.search import Collection

log = logging.getLogger(__name__)

FLAT_BELOW = 100_000  # below this an exact scan is fast enough: no approximation
HNSW_BELOW = 1_000_000  # HNSW's graph build grows too slow on a CPU beyond this; inverted lists take over
HNSW_M = 32  # neighbours per HNSW node
PQ_SIZES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per PQ code tried, largest first (each must divide d)
TARGET = 0.95  # the 10-recall@10 the default nprobe / efSearch must reach
EF_SEARCH = (16, 32, 64, 128, 256, 512)
MAX_QUERIES = 1000
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """``4G``, ``512M``, ``100K`` or a plain number of bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise ValueError(f"{text!r} is not a size: write e.g. 4G, 512M or 100000")
    return int(float(match[1]) * UNITS[match[2]])


def nlist_for(count: int) -> int:
    """Inverted lists for ``count`` vectors: sqrt(N), which keeps k-means training (64 points per list) and list
    assignment affordable on a CPU; faiss suggests 4-16 sqrt(N) for the fastest queries at the billion scale."""
    return max(1, int(round(math.sqrt(count))))


def candidates(count: int, dim: int) -> list[tuple[str, int]]:
    """Every index this collection may get, best first, with its estimated size in bytes: vectors' codes, the
    8-byte ids of inverted lists, and the fixed parts (coarse centroids, OPQ rotation, PQ codebooks)."""
    nlist = nlist_for(count)
    centroids = nlist * dim * 4
    options = []
    if count < FLAT_BELOW:
        options.append(("Flat", count * dim * 4))
    if count < HNSW_BELOW:  # level 0 holds 2M links, upper levels about one more; an offset and a level each
        options.append((f"HNSW{HNSW_M}", count * (dim * 4 + 8 * HNSW_M + 16)))
    options += [(f"IVF{nlist},Flat", count * (dim * 4 + 8) + centroids),
                (f"IVF{nlist},SQfp16", count * (dim * 2 + 8) + centroids),
                (f"IVF{nlist},SQ8", count * (dim + 8) + centroids + 2 * dim * 4)]
    options += [(f"OPQ{m},IVF{nlist},PQ{m}", count * (m + 8) + centroids + dim * dim * 4 + 256 * dim * 4)
                for m in PQ_SIZES if dim % m == 0 and m < dim]
    return options


def choose_factory(count: int, dim: int, budget: int | None = None) -> str:
    """The first of :func:`candidates` that fits ``budget`` bytes (no budget: the first)."""
    options = candidates(count, dim)
    for factory, size in options:
        if budget is None or size <= budget:
            return factory
    factory, size = options[-1]
    raise UserError(f"--max-index-memory {budget / 2**20:.1f} MiB is too small for {count} vectors of {dim} "
                    f"dimensions: the smallest index ({factory}) needs about {size / 2**20:.1f} MiB; allow that much")


def train_size(count: int, factory: str) -> int:
    """Rows to train on: 64 per inverted list, and for PQ codebooks at least the 39 x 256 faiss asks for."""
    match = re.search(r"IVF(\d+)", factory)
    wanted = 64 * int(match[1]) if match else 0
    return min(count, max(wanted, 39 * 256) if "PQ" in factory else wanted)


def sample_rows(count: int, factory: str, seed: int = 0, queries: int = MAX_QUERIES) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training rows and held-out query rows of a seeded random order: the queries come after the training
    rows in it, so they are unseen by training whenever the collection has rows to spare. Only the rows needed are
    drawn (memory of the sample, not of the collection: a permutation of a billion rows would take 8 GB)."""
    train = train_size(count, factory)
    order = np.random.default_rng(seed).choice(count, min(count, train + queries), replace=False)
    held_out = order[train:train + queries] if count - train >= min(queries, count) else order[:queries]
    return np.sort(order[:train]), np.sort(held_out)


def build_index(features: np.ndarray, factory: str, seed: int = 0, rows_per_step: int = 65536) -> Any:
    """A faiss inner-product index of unit rows (N, d) made by ``faiss.index_factory``, trained on the seeded
    sample of :func:`sample_rows` and filled by blocks, so a memory-mapped matrix is never copied whole."""
    count, dim = features.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise UserError(f"--index-factory {factory!r}: faiss cannot make it ({str(error).strip().splitlines()[-1]})"
                        ) from error
    if not index.is_trained:
        train, _ = sample_rows(count, factory, seed)
        if len(train) < max(nlist_of(index), 256 if "PQ" in factory else 1):
            raise UserError(f"{factory} needs more vectors to train than the {count} of this collection; "
                            f"choose a smaller index (--index-factory Flat)")
        index.train(np.ascontiguousarray(features[train], dtype=np.float32))
    for start in range(0, count, rows_per_step):
        index.add(np.ascontiguousarray(features[start:start + rows_per_step], dtype=np.float32))
    return index


def nlist_of(index: Any) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf.nlist if ivf is not None else 1


def search_parameter(index: Any) -> str | None:
    """The name of the index's speed/recall knob: nprobe (inverted lists), efSearch (HNSW) or None (exact)."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    return "efSearch" if "HNSW" in type(index).__name__ else None


def sweep_values(index: Any) -> list[int | None]:
    """The values a report measures: powers of two up to nlist (and nlist: every list, exact up to the codes),
    or :data:`EF_SEARCH`; [None] for an exact index."""
    name = search_parameter(index)
    if name == "nprobe":
        nlist = nlist_of(index)
        return sorted({2**i for i in range(int(math.log2(nlist)) + 1)} | {nlist})
    return list(EF_SEARCH) if name == "efSearch" else [None]


def current_value(index: Any) -> int | None:
    """The nprobe or efSearch the index now uses (None for an exact index)."""
    name = search_parameter(index)
    if name == "nprobe":
        return int(faiss.extract_index_ivf(index).nprobe)
    return int(index.hnsw.efSearch) if name == "efSearch" else None


def describe(index: Any) -> str:
    """The index's faiss class, and its preprocessing and inverted index when wrapped (OPQ+IVF+PQ)."""
    parts = [type(index).__name__]
    if isinstance(index, faiss.IndexPreTransform):
        parts = [type(index.chain.at(0)).__name__, type(faiss.downcast_index(index.index)).__name__]
    return "+".join(parts)


def set_parameter(index: Any, value: int | None) -> None:
    name = search_parameter(index)
    if name is not None and value is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, min(value, nlist_of(index)) if name == "nprobe"
                                                   else value)


def index_search(index: Any, queries: np.ndarray, k: int, value: int | None = None, rerank: int | None = None,
                 features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` scores and rows (Q, k) of a faiss index, best first; ``value`` sets nprobe / efSearch (default:
    the one saved with the index). With ``rerank`` R, the index's top R are scored again exactly against the
    stored ``features`` (compressed codes only shortlist). Rows a query could not fill are -1."""
    set_parameter(index, value)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    wanted = min(max(k, rerank or 0), index.ntotal)
    scores, rows = index.search(queries, wanted)
    rows = rows.astype(np.int64)
    if rerank:
        if features is None:
            raise ValueError("re-ranking needs the stored features")
        exact = np.einsum("qd,qkd->qk", queries, np.asarray(features[np.maximum(rows, 0)], dtype=np.float32))
        scores = np.where(rows >= 0, exact, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    return scores[:, :k], rows[:, :k]


def without_self(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each query's first ``k`` rows other than its own (a query taken from the collection finds itself first,
    which says nothing about the index); -1 pads."""
    kept = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (found, row) in enumerate(zip(rows, own)):
        others = found[(found != row) & (found >= 0)][:k]
        kept[i, :len(others)] = others
    return kept


def recalls(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """10-recall@10 (share of the true top 10 among the found top 10) and 1-recall@1 (the true nearest found
    first), averaged over queries; ``found`` and ``truth`` are (Q, 10) rows, -1 where a collection of fewer rows
    has none (its true top 10 is then shorter)."""
    at10 = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(int((b >= 0).sum()), 1) for a, b in zip(found, truth)])
    return float(at10), float(np.mean(found[:, 0] == truth[:, 0]))


def measure(index: Any, features: np.ndarray, query_rows: np.ndarray, rerank: int | None = None, k: int = 10,
            texts: np.ndarray | None = None) -> list[dict[str, Any]]:
    """For each of :func:`sweep_values`: 10-recall@10 and 1-recall@1 against exact search of the held-out rows
    (self-matches left out) and, with ``texts`` (T, d), of those text queries (``text_recall_*``: nothing left
    out); and the p50 / p99 latency of one held-out query at a time. Stops once every recall@10 is perfect."""
    from misc.collections.search import exact_search

    sets = {"": (np.ascontiguousarray(features[query_rows], dtype=np.float32), query_rows)}
    if texts is not None and len(texts):
        sets["text_"] = (np.ascontiguousarray(texts, dtype=np.float32), np.full(len(texts), -1, dtype=np.int64))
    truths = {prefix: without_self(exact_search(queries, features, k + 1)[1], own, k)
              for prefix, (queries, own) in sets.items()}
    name, rows = search_parameter(index), []
    for value in sweep_values(index):
        row: dict[str, Any] = {name or "exact": value}
        for prefix, (queries, own) in sets.items():
            found, seconds = np.full((len(queries), k + 1), -1, dtype=np.int64), []  # -1: fewer rows than k + 1
            for i, query in enumerate(queries):
                started = time.perf_counter()
                rows_found = index_search(index, query[None], k + 1, value, rerank, features)[1][0]
                found[i, :len(rows_found)] = rows_found
                seconds.append(time.perf_counter() - started)
            at10, at1 = recalls(without_self(found, own, k), truths[prefix])
            row.update({f"{prefix}recall_10_at_10": round(at10, 4), f"{prefix}recall_1_at_1": round(at1, 4)})
            if not prefix:
                row.update({"latency_ms_p50": round(1000 * float(np.percentile(seconds, 50)), 4),
                            "latency_ms_p99": round(1000 * float(np.percentile(seconds, 99)), 4)})
        rows.append(row)
        if lowest_recall(row) == 1.0:
            break
    return rows


def lowest_recall(row: dict[str, Any]) -> float:
    """The lowest 10-recall@10 of a sweep row over its query sets (held-out rows, text queries)."""
    return min(value for key, value in row.items() if key.endswith("recall_10_at_10"))


def default_value(sweep: list[dict[str, Any]], name: str | None) -> tuple[int | None, bool]:
    """The smallest swept value whose every 10-recall@10 reaches :data:`TARGET`, and True; else the best measured
    one (by its lowest recall), and False."""
    if name is None:
        return None, lowest_recall(sweep[0]) >= TARGET
    for row in sweep:
        if lowest_recall(row) >= TARGET:
            return row[name], True
    return max(sweep, key=lowest_recall)[name], False


def report(index: Any, factory: str, features: np.ndarray, seed: int, build_s: float, budget: int | None,
           rerank: int | None = None, texts: np.ndarray | None = None) -> dict[str, Any]:
    """Measure a fresh index (:func:`measure` on the held-out rows of :func:`sample_rows`, and on the text queries
    ``texts`` when the collection has captions), set its default nprobe / efSearch, and return the record kept
    next to it; a target not reached is logged in one line."""
    _, query_rows = sample_rows(len(features), factory, seed)
    sweep = measure(index, features, query_rows, rerank, texts=texts)
    name = search_parameter(index)
    value, reached = default_value(sweep, name)
    set_parameter(index, value)
    best = max(lowest_recall(row) for row in sweep)
    which = " (the lower of held-out rows and text queries)" if texts is not None and len(texts) else ""
    note = None if reached else (f"{factory} cannot reach 10-recall@10 >= {TARGET} on this collection (best "
                                 f"{best:.3f}{f' at {name} {value}' if name else ''}{which}): allow more "
                                 f"--max-index-memory or pass --rerank")
    if note:
        log.warning("%s", note)
    return {"factory": factory, "count": int(index.ntotal), "dim": int(features.shape[1]),
            "max_index_memory": budget, "seed": seed, "build_s": round(build_s, 3), "rerank": rerank,
            "target_recall_10_at_10": TARGET, "target_reached": reached, "note": note,
            "default": {name: value} if name else {}, "queries": len(query_rows),
            "query_rows": query_rows.tolist(), "text_queries": 0 if texts is None else len(texts), "sweep": sweep}


def index_files(features_path: Path) -> tuple[Path, Path, Path]:
    """Where the index of a collection lives, its sidecar (fingerprint of the features it indexes and how it was
    made) and its report: inside a sharded folder ``index.faiss``, ``index.faiss.json`` and ``index_report.json``;
    beside ``FEATURES.npz`` the same names after the file's (``FEATURES.npz.faiss``, ``FEATURES.npz.faiss.json``,
    ``FEATURES.npz.index_report.json``), as two collections may share a folder."""
    features_path = Path(features_path)
    if features_path.is_dir():
        return features_path / "index.faiss", features_path / "index.faiss.json", features_path / "index_report.json"
    return tuple(features_path.with_name(features_path.name + suffix)
                 for suffix in (".faiss", ".faiss.json", ".index_report.json"))


def load_or_build_index(collection: Collection, budget: int | None = None, factory: str | None = None,
                        rerank: int | None = None, rebuild: bool = False, seed: int = 0,
                        text_queries: Callable[[], np.ndarray | None] | None = None) -> tuple[Any, bool]:
    """The saved index of a collection when it indexes these very features and was made by the same factory
    (``factory``, else :func:`choose_factory` for ``budget``), else a new one, measured (:func:`report`, with the
    text queries ``text_queries`` gives, called only for a build) and saved with its report (:func:`index_files`).
    Returns the index and whether it was built now."""
    features = collection.features
    if not len(features):
        raise UserError(f"{collection.path} holds no rows: there is nothing to index")
    index_path, sidecar, report_path = index_files(collection.path)
    fingerprint = sharded_fingerprint if collection.path.is_dir() else npz_fingerprint  # -o FOLDER, or an .npz
    wanted = {"features": fingerprint(collection.path), "count": len(features),
              "factory": factory or choose_factory(*features.shape, budget)}
    if index_path.exists() and sidecar.exists() and not rebuild:
        try:
            if json.loads(sidecar.read_text(encoding="utf-8")) == wanted:
                return faiss.read_index(str(index_path)), False
            log.info("index %s is stale or was built differently; rebuilding", index_path)
        except (ValueError, RuntimeError) as error:
            log.warning("unreadable index %s (%s); rebuilding", index_path, error)
    started = time.perf_counter()
    index = build_index(features, wanted["factory"], seed)
    built_s = time.perf_counter() - started
    log.info("built %s index of %d vectors in %.1f s", wanted["factory"], index.ntotal, built_s)
    record = report(index, wanted["factory"], features, seed, built_s, budget, rerank,
                    text_queries() if text_queries is not None else None)
    try:
        with atomic_path(index_path) as temporary:
            faiss.write_index(index, str(temporary))
        size = index_path.stat().st_size
        write_json(sidecar, wanted)
    except (UserError, OSError, RuntimeError) as error:  # faiss reports a failed write as a RuntimeError
        log.warning("could not save the index to %s (%s); it is used for this search only, and built again next "
                    "time", index_path, str(error).strip().splitlines()[0])
        size = None
    else:
        log.info("saved the index to %s", index_path)
    record["bytes_per_vector"] = None if size is None else round(size / max(1, index.ntotal), 2)  # as saved
    try:
        write_json(report_path, record)
    except (UserError, OSError) as error:
        log.warning("could not write the index report %s (%s)", report_path, error)
    return index, True
