"""faiss indexes chosen from a memory budget, with their recall on record: the factory each budget and size gets
(worked out by hand here), the report's recall against an exact search done here with numpy (a query row is not
its own neighbour), the default nprobe, the report of every build, the line of a build below the target,
re-ranking, and near-duplicate removal."""
from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest

import search as search_cli
from misc.collections.index import (build_index, choose_factory, index_search, load_or_build_index, parse_bytes,
                                    sample_rows, without_self)
from misc.collections.search import dedup, load_collection
from misc.collections.shard_run import run_manifest
from misc.collections.shards import ShardFolder, ShardRows
from misc.collections.sources import Shard
from misc.errors import UserError
from misc.store.arrays import write_npz

MiB = 2**20


def clustered(count: int, dim: int, seed: int, clusters: int = 20) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (a collection with neighbourhoods, like real ones)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def saved(tmp_path, features: np.ndarray):
    path = tmp_path / "images.npz"
    write_npz(path, {"features": features, "paths": np.array([f"{i}.jpg" for i in range(len(features))])})
    return load_collection(path)


def sharded(folder, features: np.ndarray, captions: list[str | None] | None = None):
    """``features`` as a sharded image extraction of two shards, with these captions."""
    names = [f"{i}.jpg" for i in range(len(features))]
    captions = captions or [None] * len(features)
    half = len(features) // 2
    shards = [Shard(0, files=tuple(names[:half]), captions=tuple(captions[:half])),
              Shard(1, files=tuple(names[half:]), captions=tuple(captions[half:]))]
    store = ShardFolder(folder)
    store.open(run_manifest("photos", shards, {"checkpoint_sha256": "c", "size": 64}, features.shape[1], "float32"))
    for shard, rows in zip(shards, (slice(0, half), slice(half, None))):
        store.write(shard.number, ShardRows(features[rows], names[rows], names[rows], ["0" * 40] * len(names[rows]),
                                            captions[rows], []), "float32", {})
    store.close()
    return load_collection(folder)


def test_sizes_parse():
    assert parse_bytes("4G") == 4 * 1024**3 and parse_bytes("512M") == 512 * 1024**2
    assert parse_bytes("100000") == 100000 and parse_bytes("1.5K") == 1536 and parse_bytes("2GiB") == 2 * 1024**3
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_the_factory_follows_the_size_and_the_budget():
    # 50k x 256: flat (50k * 1 KiB) when it fits; one byte less and HNSW (bigger) and IVF-flat (+8 B ids and
    # 224 x 1 KiB centroids) do not fit either, so fp16 codes: 50k * (512 + 8) + 224 KiB.
    assert choose_factory(50_000, 256) == "Flat"
    assert choose_factory(50_000, 256, 50_000 * 1024) == "Flat"
    assert choose_factory(50_000, 256, 50_000 * 1024 - 1) == "IVF224,SQfp16"
    assert choose_factory(50_000, 256, 50_000 * 520 + 224 * 1024) == "IVF224,SQfp16"
    assert choose_factory(50_000, 256, 50_000 * 520 + 224 * 1024 - 1) == "IVF224,SQ8"
    assert choose_factory(500_000, 256) == "HNSW32"  # 500k x (1024 + 8 x 32 links + 16) = 648 MB
    assert choose_factory(500_000, 256, 648_000_000) == "HNSW32"
    assert choose_factory(500_000, 256, 647_999_999) == "IVF707,Flat"  # round(sqrt(500k)) lists
    assert choose_factory(2_000_000, 256) == "IVF1414,Flat"
    # 1M x 256 with 1000 lists: SQ8 needs 1M x 264 + 1000 KiB + 2 KiB = 265.0 MB; PQ64 + OPQ: 1M x 72 + 1000 KiB
    # of centroids + 256 KiB rotation + 256 KiB codebooks = 73.5 MB; PQ8: 16 MB + the same 1.5 MB.
    assert choose_factory(1_000_000, 256, 300 * MiB) == "IVF1000,SQ8"
    assert choose_factory(1_000_000, 256, 100 * MiB) == "OPQ64,IVF1000,PQ64"
    assert choose_factory(1_000_000, 256, 1_000_000 * 16 + 1_024_000 + 2 * 262_144) == "OPQ8,IVF1000,PQ8"
    assert choose_factory(1_000_000, 256, 1_000_000 * 16 + 1_024_000 + 2 * 262_144 - 1) == "OPQ4,IVF1000,PQ4"
    with pytest.raises(UserError, match="too small for 1000000 vectors of 256 dimensions"):
        choose_factory(1_000_000, 256, 10 * MiB)
    # d = 96: 64 divides it not, 48 bytes (56 MB) do not fit; 1M x 40 + 0.5 MB of fixed parts fit 40 MiB, not 40 MB
    assert choose_factory(1_000_000, 96, 40 * MiB) == "OPQ32,IVF1000,PQ32"
    assert choose_factory(1_000_000, 96, 40_000_000) == "OPQ24,IVF1000,PQ24"


def test_report_recall_is_that_of_an_exact_numpy_search_without_self_matches(tmp_path):
    features = clustered(3000, 16, 0)
    collection = saved(tmp_path, features)
    index, built = load_or_build_index(collection, factory="IVF32,Flat")
    report = json.loads((tmp_path / "images.npz.index_report.json").read_text())
    rows = np.array(report["query_rows"])
    assert built and report["queries"] == len(rows) == 1000 and len(set(rows.tolist())) == 1000
    scores = features[rows] @ features.T
    scores[np.arange(len(rows)), rows] = -np.inf  # a row is not its own neighbour
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    ivf = faiss.extract_index_ivf(index)
    expected = {}
    for entry in report["sweep"]:
        ivf.nprobe = entry["nprobe"]
        found = index.search(features[rows], 11)[1]
        mine = np.array([[r for r in f if r != own][:10] for f, own in zip(found, rows)])
        at10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(mine, truth)])
        expected[entry["nprobe"]] = at10
        assert entry["recall_10_at_10"] == pytest.approx(at10, abs=1e-4)
        assert entry["recall_1_at_1"] == pytest.approx(np.mean(mine[:, 0] == truth[:, 0]), abs=1e-4)
        assert 0 < entry["latency_ms_p50"] <= entry["latency_ms_p99"]
        if entry["nprobe"] == 1:  # counting itself, every query would find itself first through its own list
            assert np.mean(found[:, 0] == rows) > 0.99 and entry["recall_1_at_1"] < 0.99
    assert [e["nprobe"] for e in report["sweep"]][:3] == [1, 2, 4]
    smallest = min(nprobe for nprobe, at10 in expected.items() if at10 >= 0.95)
    assert report["default"] == {"nprobe": smallest} and report["target_reached"] and report["note"] is None
    assert faiss.extract_index_ivf(faiss.read_index(str(tmp_path / "images.npz.faiss"))).nprobe == smallest
    assert load_or_build_index(collection, factory="IVF32,Flat")[1] is False


def test_text_queries_are_measured_too_and_the_report_lives_in_the_sharded_folder(tmp_path):
    features = clustered(3000, 16, 0)
    rng = np.random.default_rng(7)  # text queries near the same clusters, all moved one way (a modality gap)
    texts = clustered(300, 16, 0) + 0.5 * rng.standard_normal(16) / 4
    texts = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype(np.float32)
    collection = sharded(tmp_path / "photos", features)
    index, built = load_or_build_index(collection, factory="IVF32,Flat", text_queries=lambda: texts)
    assert built and (tmp_path / "photos" / "index.faiss").is_file() and not list(tmp_path.glob("photos.*"))
    report = json.loads((tmp_path / "photos" / "index_report.json").read_text())
    assert report["text_queries"] == 300 and report["queries"] == 1000
    truth = np.argsort(-(texts @ features.T), axis=1, kind="stable")[:, :10]  # nothing to leave out
    ivf, reached = faiss.extract_index_ivf(index), []
    for entry in report["sweep"]:
        ivf.nprobe = entry["nprobe"]
        found = index.search(texts, 11)[1][:, :10]
        assert entry["text_recall_10_at_10"] == pytest.approx(
            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]), abs=1e-4)
        assert entry["text_recall_1_at_1"] == pytest.approx(np.mean(found[:, 0] == truth[:, 0]), abs=1e-4)
        if min(entry["recall_10_at_10"], entry["text_recall_10_at_10"]) >= 0.95:
            reached.append(entry["nprobe"])
    assert report["sweep"][0]["text_recall_10_at_10"] < 0.95  # one list: the text queries miss neighbours
    assert report["default"] == {"nprobe": min(reached)} and report["target_reached"]
    assert load_or_build_index(load_collection(tmp_path / "photos"), factory="IVF32,Flat")[1] is False


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,SQ8", "IVF16,SQfp16", "OPQ4,IVF16,PQ4"])
def test_every_build_writes_its_report(tmp_path, factory):
    features = clustered(1200, 16, 1)
    collection = saved(tmp_path, features)
    index, _ = load_or_build_index(collection, factory=factory)
    report = json.loads((tmp_path / "images.npz.index_report.json").read_text())
    size = (tmp_path / "images.npz.faiss").stat().st_size
    assert report["factory"] == factory and report["count"] == 1200 and report["build_s"] >= 0
    assert report["bytes_per_vector"] == pytest.approx(size / 1200, abs=0.01)
    knob = {"Flat": "exact", "HNSW32": "efSearch"}.get(factory, "nprobe")
    assert all(knob in entry for entry in report["sweep"])
    if factory == "Flat":
        assert report["sweep"][0]["recall_10_at_10"] == 1.0 and report["default"] == {}


def test_a_build_below_the_target_says_so_in_one_line(tmp_path, caplog):
    features = np.random.default_rng(2).standard_normal((1200, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)  # no neighbourhoods: 4-byte codes cannot rank
    with caplog.at_level(logging.WARNING):
        load_or_build_index(saved(tmp_path, features), factory="OPQ4,IVF16,PQ4")
    report = json.loads((tmp_path / "images.npz.index_report.json").read_text())
    best = max(entry["recall_10_at_10"] for entry in report["sweep"])
    assert best < 0.95 and not report["target_reached"]
    lines = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert lines == [report["note"]] and "\n" not in report["note"]
    assert report["note"].startswith("OPQ4,IVF16,PQ4 cannot reach 10-recall@10 >= 0.95")
    assert report["default"]["nprobe"] == max(report["sweep"], key=lambda e: e["recall_10_at_10"])["nprobe"]


def test_reranking_every_candidate_gives_the_exact_order():
    features, queries = clustered(1200, 16, 3), clustered(5, 16, 4)
    index = build_index(features, "OPQ4,IVF16,PQ4")
    exact = np.argsort(-(queries @ features.T), axis=1, kind="stable")[:, :10]
    rows = index_search(index, queries, 10, 16, rerank=1200, features=features)[1]
    np.testing.assert_array_equal(rows, exact)
    assert not np.array_equal(index_search(index, queries, 10, 16)[1], exact)  # the codes alone do not


def test_without_self_and_dedup():
    np.testing.assert_array_equal(without_self(np.array([[7, 3, 9], [1, -1, 2]]), np.array([3, 5]), 2),
                                  [[7, 9], [1, 2]])
    a, b = np.array([1, 0, 0], np.float32), np.array([0.8, 0.6, 0], np.float32)  # cos(a, b) = 0.8
    features = np.stack([a, a, b, np.array([0, 0, 1], np.float32)])
    assert dedup(np.array([0, 1, 2, 3]), features, 0.9, 3).tolist() == [0, 2, 3]  # row 1 repeats row 0
    assert dedup(np.array([0, 1, 2, 3]), features, 0.8, 3).tolist() == [0, 3]  # cos 0.8 >= 0.8: b dropped too


def test_build_index_cli_prints_the_report(tmp_path, capsys):
    saved(tmp_path, clustered(800, 8, 5))
    search_cli.main(["--images", str(tmp_path / "images.npz"), "--build-index", "--index-factory", "IVF8,Flat"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "images.npz.index_report.json").read_text())
    assert out.startswith("IVF8,Flat: 800 vectors,") and f'default {report["default"]}' in out
    saved(tmp_path, np.empty((0, 8), np.float32))
    with pytest.raises(UserError, match="holds no rows: there is nothing to index"):
        search_cli.main(["--images", str(tmp_path / "images.npz"), "--build-index"])
    with pytest.raises(UserError, match="--max-index-memory"):
        search_cli.main(["--images", str(tmp_path / "images.npz"), "--build-index", "--max-index-memory", "lots"])


def test_training_rows_are_a_seeded_random_sample_and_the_queries_are_held_out():
    train, queries = sample_rows(20_000, "IVF16,Flat", seed=0)
    assert len(train) == 64 * 16 and len(queries) == 1000 and not set(train) & set(queries)
    assert train.max() > 10_000 and not np.array_equal(train, np.arange(64 * 16))  # not the first rows
    assert np.array_equal(sample_rows(20_000, "IVF16,Flat", seed=0)[0], train)  # seeded
    assert not np.array_equal(sample_rows(20_000, "IVF16,Flat", seed=1)[0], train)
    assert len(sample_rows(20_000, "OPQ8,IVF16,PQ8")[0]) == 39 * 256  # what faiss asks for 256 centroids
    assert len(sample_rows(20_000, "HNSW32")[0]) == 0 and len(sample_rows(500, "Flat")[1]) == 500
    train, queries = sample_rows(1500, "IVF16,Flat")  # too few rows to hold 1000 out: queries may be trained on
    assert len(train) == 1024 and len(queries) == 1000


def test_sampling_a_billion_rows_takes_the_memory_of_the_sample_not_of_the_collection():
    import tracemalloc  # numpy reports its allocations to it

    tracemalloc.start()
    train, queries = sample_rows(10**9, "OPQ48,IVF31623,PQ48")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(train) == 64 * 31623 and len(queries) == 1000 and not np.intersect1d(train, queries).size
    assert peak < 200 * 2**20  # a permutation of the collection alone would be 8 GB


def test_a_collection_smaller_than_the_report_k_is_measured_on_the_neighbours_it_has(tmp_path):
    """Six images (the README's photos/ example): each query has five true neighbours, and a flat index finds all
    of them, so its recall is 1, not 5/10."""
    collection = saved(tmp_path, clustered(6, 8, 1, clusters=2))
    load_or_build_index(collection)
    report = json.loads((tmp_path / "images.npz.index_report.json").read_text())
    assert report["sweep"][0]["recall_10_at_10"] == 1.0 and report["sweep"][0]["recall_1_at_1"] == 1.0
    assert report["target_reached"] and report["note"] is None
