"""Sharded text extraction: a text file (plain, IMAGE<TAB>CAPTION or JSON-lines) cut into shards of lines, the
shard runner shared with images (resume, rank split), the layout read back by search.py, and as whole commands two
ranks, one of them interrupted, giving exactly the vectors of one process."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import search as search_cli
from misc.collections.search import load_collection
from misc.collections.shard_run import run_manifest
from misc.collections.shards import ShardFolder, ShardRows
from misc.collections.texts import extract_text_shards, read_text_lines, split_jsonl, split_tsv, text_shards
from misc.data.words import load_word_vectors
from misc.errors import UserError
from misc.eval.encode import encode_captions
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import finish, launch_rank, random_checkpoint, run_in_process

TINY = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
COLOURS, SHAPES = ["red", "green", "blue"], ["circle", "square", "triangle", "star"]


def caption(n: int) -> str:
    return f"a {COLOURS[n % 3]} {SHAPES[n // 3 % 4]} on the {'left' if n % 2 else 'right'}"


def caption_file(path: Path, count: int) -> Path:
    """``count`` lines of captions with, every seventh line, an empty line instead."""
    path.write_text("".join(("" if n % 7 == 3 else caption(n)) + "\n" for n in range(count)), encoding="utf-8")
    return path


def test_shards_are_runs_of_lines_of_the_file_kept_or_skipped(tmp_path: Path) -> None:
    text = read_text_lines(caption_file(tmp_path / "c.txt", 10))  # line 4 (n = 3) is empty
    shards = text_shards(text, {}, 4)
    assert [(s.first, s.last) for s in shards] == [(1, 4), (5, 8), (9, 10)]
    assert shards[0].text.numbers == [1, 2, 3] and shards[0].text.skipped == [(4, "empty line")]
    assert shards[2].text.lines == [caption(8), caption(9)] and shards[2].keys == ("9", "10")
    again = text_shards(read_text_lines(tmp_path / "c.txt"), {}, 4)
    assert [s.describe() for s in again] == [s.describe() for s in shards]
    (tmp_path / "c.txt").write_text((tmp_path / "c.txt").read_text().replace("green", "blue", 1))
    changed = text_shards(read_text_lines(tmp_path / "c.txt"), {}, 4)
    assert [a.describe() == b.describe() for a, b in zip(changed, shards)] == [False, True, True]


def test_image_caption_pairs_from_tsv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "p.tsv").write_text("a.jpg\ta red star\nno tab\n\tno image\nb.jpg\ta blue disc\n")
    text, images = split_tsv(read_text_lines(tmp_path / "p.tsv"))
    assert text.lines == ["a red star", "a blue disc"] and images == {1: "a.jpg", 4: "b.jpg"}
    assert text.skipped == [(2, "not IMAGE<TAB>CAPTION"), (3, "no image")]
    (tmp_path / "p.jsonl").write_text('{"path": "x/1.jpg", "caption": "one red star"}\n{"caption": "two stars"}\n'
                                      '{"path": "2.png"}\nnot json\n{"caption": "  "}\n{"caption": "a \\ud800"}\n')
    text, images = split_jsonl(read_text_lines(tmp_path / "p.jsonl"))
    assert text.lines == ["one red star", "two stars"] and text.numbers == [1, 2] and images == {1: "x/1.jpg"}
    assert [number for number, _ in text.skipped] == [3, 4, 5, 6] and text.skipped[2][1] == "no caption"
    assert "lone surrogate" in text.skipped[3][1]
    assert [s.keys for s in text_shards(text, images, 10)] == [("x/1.jpg", "2")]


def test_a_jsonl_file_of_captions_into_an_npz_keeps_the_image_of_each(
        tiny_checkpoint: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from misc.store.arrays import TextColumn, npz_array

    rows = [{"path": "a.jpg", "caption": "a red star\x00"}, {"path": "b.jpg", "caption": "a blue disc"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + "[1]\n")
    assert run_in_process("text_features_extraction.py", ["-p", tiny_checkpoint, "-d", tmp_path / "c.jsonl", "-o",
                                                          tmp_path / "c.npz", "--no-progress", "--device", "cpu"],
                          tiny_world, monkeypatch) == 0
    assert TextColumn(tmp_path / "c.npz", "lines").tolist() == ["a red star\x00", "a blue disc"]
    assert TextColumn(tmp_path / "c.npz", "image_paths").tolist() == ["a.jpg", "b.jpg"]
    assert npz_array(tmp_path / "c.npz", "skipped").tolist() == [["3", "not a JSON object with a 'caption' (text) "
                                                                       "and an optional 'path' (text)"]]
    assert run_in_process("text_features_extraction.py", ["-p", tiny_checkpoint, "-d", tmp_path / "c.jsonl", "-o",
                                                          tmp_path / "c", "--no-progress", "--device", "cpu"],
                          tiny_world, monkeypatch) == 0
    collection = load_collection(tmp_path / "c")
    assert collection.labels.tolist() == ["a red star\x00", "a blue disc"]  # verbatim, trailing NUL kept
    np.testing.assert_allclose(np.asarray(collection.features), npz_array(tmp_path / "c.npz", "features"),
                               atol=2e-3)  # float16 rows of the same vectors
    assert pq.read_table(tmp_path / "c" / "meta" / "000000.parquet")["key"].to_pylist() == ["a.jpg", "b.jpg"]


def test_eval_retrieval_pairs_a_sharded_text_extraction_with_sharded_images(tmp_path: Path) -> None:
    from misc.eval.features import paired_features
    from tests.test_index import clustered, sharded

    vectors = clustered(6, 8, 0)
    sharded(tmp_path / "images", vectors)  # rows 0.jpg ... 5.jpg
    captions = ShardFolder(tmp_path / "texts", "text")
    named, lines = [5, 0, 1, 2, 3, 4, 5], [f"a red star {n}" for n in range(7)]
    shards = text_shards(read_text_lines(caption_file(tmp_path / "c.txt", 1)), {}, 1)  # any one shard
    captions.open(run_manifest("c.txt", shards, {"checkpoint_sha256": "c"}, 8, "float32", "text", "lines"))
    captions.write(0, ShardRows(vectors[named], [f"{n}.jpg" for n in named], ["c.txt:1"] * 7, ["0" * 40] * 7, lines,
                                [], list(range(1, 8))), "float32", {})
    captions.close()
    embedded = paired_features(tmp_path / "images", tmp_path / "texts")
    np.testing.assert_array_equal(embedded.images, vectors)
    np.testing.assert_array_equal(embedded.captions, vectors[named])
    assert embedded.owner.tolist() == named


def test_resume_and_the_rank_split_give_the_vectors_of_the_model(tiny_world: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    words = load_word_vectors(tiny_world / "words" / "demo_word2vec.bin")
    text = read_text_lines(caption_file(tmp_path / "c.txt", 20))
    shards, out = text_shards(text, {}, 6), tmp_path / "out"  # lines 1-6, 7-12, 13-18, 19-20

    def run(**kwargs: int) -> int:
        store = ShardFolder(out, "text")
        store.open(run_manifest("c.txt", shards, {"checkpoint_sha256": "c"}, 32, "float32", "text", "lines"))
        try:
            return extract_text_shards(model, words, shards, "c.txt", store, dtype="float32",
                                       device=torch.device("cpu"), batch_size=4, progress=False, **kwargs)[0].resumed
        finally:
            store.close()

    run(rank=1, world=2)  # shards 1 and 3 only
    assert sorted(p.name for p in (out / "done").iterdir()) == ["000001.json", "000003.json"]
    assert sorted(p.name for p in (out / "emb" / "txt").iterdir()) == ["000001.npy", "000003.npy"]
    (out / "done" / "000003.json").unlink()  # as a rank killed after its vectors, before its done record
    assert run() == 1  # shard 1 only
    collection = load_collection(out)
    kept = [n for n in range(20) if n % 7 != 3]
    expected = encode_captions(model, [caption(n) for n in kept], words, "cpu", progress=False).numpy()
    assert collection.kind == "text" and collection.features.shape == (len(kept), 32)
    np.testing.assert_allclose(np.asarray(collection.features), expected, atol=1e-5)
    assert collection.labels.tolist() == [caption(n) for n in kept]
    assert collection.line_numbers.tolist() == [n + 1 for n in kept]
    meta = pq.read_table(out / "meta" / "000002.parquet").to_pydict()
    assert meta["key"] == ["13", "14", "15", "16", "17"] == [str(n) for n in meta["line"]]
    assert meta["source"][0] == "c.txt:13" and meta["id"][0] == 2 << 32
    assert json.loads((out / "done" / "000002.json").read_text())["skipped_samples"] == [["c.txt:18", "empty line"]]
    with pytest.raises(UserError, match="different kind of extraction \\(text then, image now\\)"):
        ShardFolder(out).open(run_manifest("c.txt", shards, {"checkpoint_sha256": "c"}, 32, "float32"))


# --------------------------------------------------------------------------- whole commands, several processes

@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pth.tar", TINY, tiny_world, 64)


def test_an_image_folder_s_captions_are_the_text_queries_of_its_index_report(
        tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from misc.collections.queries import caption_queries
    from misc.inference import Inference
    from tests.test_index import clustered, sharded

    captions = [caption(n % 9) if n % 4 else None for n in range(40)] + ["qwxz zzkq"]  # 9 distinct, 1 unknown
    collection = sharded(tmp_path / "photos", clustered(41, 32, 0), captions)
    model = Inference.load(tiny_checkpoint, device="cpu")
    queries = caption_queries(model, collection)
    expected = model.embed_texts(sorted({caption(n % 9) for n in range(40) if n % 4})).numpy()
    assert queries.shape == (len(expected), 32) == (9, 32)
    assert np.allclose(np.sort((queries @ expected.T).max(axis=1)), 1, atol=1e-5)  # each is one of the captions
    assert caption_queries(None, collection) is None
    search_cli.main(["--images", str(tmp_path / "photos"), "--build-index", "--index-factory", "Flat", "-p",
                     str(tiny_checkpoint), "--device", "cpu"])
    report = json.loads((tmp_path / "photos" / "index_report.json").read_text())
    assert report["text_queries"] == 9 and report["sweep"][0]["text_recall_10_at_10"] == 1.0
    assert "41 held-out rows, 9 caption queries" in capsys.readouterr().out


def extract(checkpoint: Path, data: Path, out: Path, rank: int = 0, world: int = 1) -> subprocess.Popen:
    return launch_rank("text_features_extraction.py", ["-p", str(checkpoint), "-d", str(data), "-o", str(out),
                                                       "--chunk-size", "5", "--batch-size", "3"], rank, world)


def read_all(out: Path, shards: int) -> np.ndarray:
    return np.concatenate([np.load(out / "emb" / "txt" / f"{n:06d}.npy") for n in range(shards)])


@pytest.mark.slow
def test_two_ranks_and_an_interrupted_rank_give_the_vectors_of_one_process(
        tiny_checkpoint: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    data = caption_file(tmp_path / "captions.txt", 23)  # 5 shards of 5 lines
    finish(extract(tiny_checkpoint, data, tmp_path / "one"))
    reference = read_all(tmp_path / "one", 5)
    assert reference.shape == (20, 32) and reference.dtype == np.float16

    out = tmp_path / "two"
    finish(extract(tiny_checkpoint, data, out, 0, 2))  # rank 0 alone: shards 0, 2, 4
    (out / "done" / "000002.json").unlink()  # killed after shard 2's vectors, before its done record
    np.save(out / "emb" / "txt" / "000004.npy", np.zeros((4, 32), np.float16))  # and a damaged shard
    ranks = [extract(tiny_checkpoint, data, out, rank, 2) for rank in range(2)]
    outputs = [finish(rank) for rank in ranks]
    assert "rank 0: 3 shards (1 already done), 7 lines" in outputs[0]  # shards 2 and 4: lines 12-15, 21-23
    assert "rank 1: 2 shards (0 already done), 9 lines" in outputs[1]
    np.testing.assert_array_equal(read_all(out, 5), reference)
    assert "rank 0: 5 shards (5 already done), 0 lines embedded" in finish(extract(tiny_checkpoint, data, out))

    images = tmp_path / "images"
    assert run_in_process("image_features_extraction.py", ["-p", tiny_checkpoint, "-d", tiny_world / "images" /
                                                           "val2014", "-o", images, "--workers", "0",
                                                           "--no-progress", "--device", "cpu"],
                          tiny_world, monkeypatch) == 0
    image_vectors = np.load(images / "emb" / "img" / "000000.npy").astype(np.float32)
    assert run_in_process("search.py", ["--images", images, "--texts", out, "--image", 3, "-k", 4, "--json", "-"],
                          tiny_world, monkeypatch) == 0
    found = json.loads(capsys.readouterr().out)
    scores = reference.astype(np.float32) @ image_vectors[3]
    best = np.argsort(-scores, kind="stable")[:4]
    kept = [n for n in range(23) if n % 7 != 3]
    assert found["kind"] == "text" and found["size"] == 20
    assert [(e["line_number"], e["line"]) for e in found["queries"][0]["results"]] == \
        [(kept[row] + 1, caption(kept[row])) for row in best]
    np.testing.assert_allclose([e["score"] for e in found["queries"][0]["results"]], scores[best], atol=1e-5)
