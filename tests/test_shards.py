"""Sharded extraction: tar shards (brace patterns, keys, damaged members and tars), the output folder (manifest,
done records, locks, resume), the memory-mapped collection search reads, and, as whole commands, two ranks or a
killed rank giving exactly the vectors of one uninterrupted process."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from misc.collections.index import index_search, load_or_build_index
from misc.collections.search import exact_search, load_collection
from misc.collections.shard_run import ShardImages, extract_shards, run_manifest
from misc.collections.shards import ShardFolder, ShardedRows, ShardRows, is_sharded, row_ids
from misc.collections.sources import Sample, Shard, Skip, expand_tars, find_shards, read_entries, read_tar
from misc.errors import UserError
from misc.eval.features import paired_features
from misc.store.arrays import text_column, write_npz
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import finish, launch_rank, random_checkpoint, run_in_process

SIZE = 64
TINY = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)


def jpeg(seed: int) -> bytes:
    """A small random JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of the given members, in that order (written with the standard library, as a user's tool would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def image_tars(folder: Path, shards: int, per_shard: int) -> str:
    """``shards`` tars of ``per_shard`` captioned JPEGs each; returns their brace pattern."""
    for shard in range(shards):
        members = []
        for row in range(per_shard):
            key = f"s{shard}/{row:04d}"
            members += [(f"{key}.jpg", jpeg(shard * 100 + row)), (f"{key}.txt", f"caption {shard} {row}".encode())]
        write_tar(folder / f"{shard:06d}.tar", members)
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def read_all(folder: Path, shards: int) -> np.ndarray:
    return np.concatenate([np.load(folder / "emb" / "img" / f"{n:06d}.npy") for n in range(shards)])


# --------------------------------------------------------------------------- inputs

def test_brace_pattern_expands_in_order_and_counts_the_files(tmp_path: Path) -> None:
    pattern = image_tars(tmp_path, 3, 1)
    assert expand_tars(pattern) == [tmp_path / f"00000{n}.tar" for n in range(3)]
    with pytest.raises(UserError, match=r"names 4 tar shards but 3 exist \(first missing: .*000003.tar\)"):
        expand_tars(str(tmp_path / "{000000..000003}.tar"))


def test_key_is_the_member_path_up_to_the_first_dot(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "a.tar", [("dir/0001.jpg", jpeg(1)), ("dir/0001.txt", b"a dog "),
                                         ("dir/x.y.png", b"png bytes"), ("dir/x.y.json", b'{"caption": "a cat"}')])
    samples = list(read_tar(tar))
    assert [(s.key, s.caption) for s in samples] == [("dir/0001", "a dog"), ("dir/x", "a cat")]
    assert samples[0].source == f"{tar}:dir/0001.jpg" and samples[0].data == jpeg(1)


def test_damaged_tars_are_reported_skips(tmp_path: Path) -> None:
    good = [("k0.jpg", jpeg(0)), ("k1.jpg", b"not an image"), ("k2.txt", b"no image"), ("k0.txt", b"again")]
    tar = write_tar(tmp_path / "0.tar", good)
    items = list(read_tar(tar))
    assert [type(item) for item in items] == [Sample, Sample, Skip, Skip]
    assert "expected one image member" in items[2].reason and "duplicate key" in items[3].reason
    whole = write_tar(tmp_path / "whole.tar", [("a.jpg", jpeg(1)), ("b.jpg", jpeg(2))]).read_bytes()
    truncated = tmp_path / "1.tar"
    first = 512 + -(-len(jpeg(1)) // 512) * 512  # a header block, then the data padded to whole blocks
    truncated.write_bytes(whole[:first + 512 + 100])  # a.jpg whole, b.jpg cut inside its data
    items = list(read_tar(truncated))
    assert [type(item) for item in items] == [Sample, Skip] and items[0].key == "a"
    assert items[1].where == str(truncated) and "truncated or corrupt tar after 1 members" in items[1].reason
    shards, folder = find_shards(str(tmp_path / "{0..1}.tar"), None, 1000)
    batches = list(ShardImages(shards, folder, SIZE, batch_size=8))
    assert [(b.shard, len(b.samples), len(b.skipped), b.last) for b in batches] == [(0, 1, 3, True), (1, 1, 1, True)]
    assert "k1.jpg" in batches[0].skipped[0][0] and "UnidentifiedImageError" in batches[0].skipped[0][1]


def test_list_files_with_captions(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"path": "x/1.jpg", "caption": "one"}\n\n{"path": "2.png"}\n')
    (tmp_path / "a.csv").write_text("path,caption\nx/1.jpg,one\n2.png,\n")
    assert read_entries(tmp_path / "a.jsonl", tmp_path) == (["x/1.jpg", "2.png"], ["one", None])
    assert read_entries(tmp_path / "a.csv", tmp_path) == (["x/1.jpg", "2.png"], ["one", ""])
    (tmp_path / "twice.csv").write_text("path\na.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(UserError, match=r"row 3 repeats 'a.jpg' \(row 1\)"):
        read_entries(tmp_path / "twice.csv", tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"file": "x.jpg"}\n')
    with pytest.raises(UserError, match="every row needs a 'path'"):
        read_entries(tmp_path / "bad.jsonl", tmp_path)
    assert is_sharded(Path("out")) and not is_sharded(Path("out.npz"))


# --------------------------------------------------------------------------- the output folder

def manifest(source: str = "x", dtype: str = "float16") -> dict:
    return {"version": 1, "source": source, "shards": [{"tar": "a.tar", "bytes": 10}], "checkpoint_sha256": "c",
            "size": SIZE, "protocol": "resize", "dim": 32, "dtype": dtype}


def test_manifest_mismatch_and_second_run_are_refused(tmp_path: Path) -> None:
    first = ShardFolder(tmp_path / "out")
    assert first.open(manifest(), rank=0, world=2) is False
    with pytest.raises(UserError, match="another run is writing"):
        ShardFolder(tmp_path / "out").open(manifest(), rank=0, world=2)
    with pytest.raises(UserError, match="another run is writing"):
        ShardFolder(tmp_path / "out").open(manifest(), rank=0, world=1)
    second_rank = ShardFolder(tmp_path / "out")
    assert second_rank.open(manifest(), rank=1, world=2) is True  # the same run's other rank
    first.close()
    second_rank.close()
    with pytest.raises(UserError, match=r"manifest.json was made with a different --dtype \(float16 then, float32"):
        ShardFolder(tmp_path / "out").open(manifest(dtype="float32"))


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY).image.eval()


def test_resume_recomputes_only_missing_shards(tmp_path: Path, encoder: torch.nn.Module) -> None:
    pattern = image_tars(tmp_path / "tars", 4, 3)
    shards, folder = find_shards(pattern, None, 1000)
    out = tmp_path / "out"

    def run(**kwargs: int) -> int:
        store = ShardFolder(out)
        store.open(run_manifest(pattern, shards, {"checkpoint_sha256": "c", "size": SIZE}, 32, "float32"))
        try:
            return extract_shards(encoder, shards, folder, store, size=SIZE, dtype="float32",
                                  device=torch.device("cpu"), batch_size=2, workers=0, progress=False,
                                  **kwargs).resumed
        finally:
            store.close()

    run(rank=0, world=2)  # shards 0 and 2 only, as rank 0 of 2
    assert sorted(p.name for p in (out / "done").iterdir()) == ["000000.json", "000002.json"]
    before = {n: (out / "emb" / "img" / f"{n:06d}.npy").stat().st_mtime_ns for n in (0, 2)}
    np.save(out / "emb" / "img" / "000002.npy", np.zeros((3, 32), np.float32))  # damaged after its done record
    assert run() == 1  # only shard 0 is skipped: 2 fails its checksum, 1 and 3 were never done
    assert (out / "emb" / "img" / "000000.npy").stat().st_mtime_ns == before[0]
    vectors = read_all(out, 4)
    expected = torch.cat([encoder(torch.stack([_tensor(jpeg(s * 100 + r)) for r in range(3)])) for s in range(4)])
    np.testing.assert_allclose(vectors, expected.detach().numpy(), atol=1e-5)
    meta = pq.read_table(out / "meta" / "000003.parquet").to_pydict()
    assert meta["id"] == list(row_ids(3, 3)) == [3 << 32, (3 << 32) + 1, (3 << 32) + 2]
    assert meta["key"] == ["s3/0000", "s3/0001", "s3/0002"] and meta["caption"][1] == "caption 3 1"
    done = json.loads((out / "done" / "000003.json").read_text())
    assert done["rows"] == 3 and done["skipped"] == 0
    collection = load_collection(out)
    assert collection.features.shape == (12, 32) and collection.labels[4].endswith("000001.tar:s1/0001.jpg")
    np.testing.assert_array_equal(collection.features[[11, 0, 5]], vectors[[11, 0, 5]])
    np.testing.assert_array_equal(collection.features[3:7], vectors[3:7])
    scores, rows = exact_search(vectors[[7]], collection.features, 3)
    assert rows[0, 0] == 7 and np.isclose(scores[0, 0], 1.0, atol=1e-5)
    index, built = load_or_build_index(collection)
    assert built and index.ntotal == 12 and index_search(index, vectors[[7]], 3)[1].tolist() == rows.tolist()
    assert load_or_build_index(load_collection(out))[1] is False  # saved inside the folder, reused
    assert (out / "index.faiss").is_file() and (out / "index_report.json").is_file()


def test_an_empty_shard_is_stored_and_read_back(tmp_path: Path, encoder: torch.nn.Module) -> None:
    write_tar(tmp_path / "000000.tar", [])
    write_tar(tmp_path / "000001.tar", [("a.jpg", jpeg(5)), ("b.png", b"broken")])
    shards, folder = find_shards(str(tmp_path / "{000000..000001}.tar"), None, 1000)
    store = ShardFolder(tmp_path / "out")
    store.open(run_manifest("x", shards, {"checkpoint_sha256": "c", "size": SIZE}, 32, "float16"))
    run = extract_shards(encoder, shards, folder, store, size=SIZE, dtype="float16", device=torch.device("cpu"),
                         workers=0, progress=False)
    store.close()
    assert (run.rows, len(run.skipped)) == (1, 1) and "b.png" in run.skipped[0][0]
    assert np.load(tmp_path / "out" / "emb" / "img" / "000000.npy").shape == (0, 32)
    assert json.loads((tmp_path / "out" / "done" / "000001.json").read_text())["skipped"] == 1
    collection = load_collection(tmp_path / "out")
    assert collection.features.shape == (1, 32) and collection.labels.tolist() == [f"{tmp_path / '000001.tar'}:a.jpg"]

def _tensor(data: bytes) -> torch.Tensor:
    from misc.data.datasets import eval_transform
    from misc.data.images import decode_image

    return eval_transform(SIZE)(decode_image(data, SIZE))


def test_sharded_rows_reads_like_the_concatenation() -> None:
    parts = [np.arange(6, dtype=np.float16).reshape(3, 2), np.empty((0, 2), np.float16), np.ones((2, 2), np.float16)]
    whole = np.concatenate(parts).astype(np.float32)
    rows = ShardedRows(parts)
    assert rows.shape == (5, 2) and len(rows) == 5
    np.testing.assert_array_equal(rows[1:4], whole[1:4])
    np.testing.assert_array_equal(rows[np.array([4, 0, -1])], whole[[4, 0, -1]])
    np.testing.assert_array_equal(rows[2], whole[2])
    np.testing.assert_array_equal(np.asarray(rows), whole)


def test_eval_retrieval_pairs_captions_with_a_sharded_extraction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store, sources = ShardFolder(tmp_path / "out"), [f"photos/{n}.jpg" for n in range(5)]
    shards = [Shard(0, files=tuple(sources[:3]), captions=(None,) * 3), Shard(1, files=tuple(sources[3:]),
                                                                              captions=(None,) * 2)]
    store.open(run_manifest("photos", shards, {"checkpoint_sha256": "c", "size": SIZE}, 8, "float32"))
    for shard, rows in zip(shards, (range(0, 3), range(3, 5))):
        store.write(shard.number, ShardRows(vectors[rows], [sources[r] for r in rows], [sources[r] for r in rows],
                                            ["0" * 40] * len(rows), [None] * len(rows), []), "float32", {})
    store.close()
    named = [sources[n] for n in (4, 0, 1, 2, 3, 4)]
    write_npz(tmp_path / "captions.npz", {"features": vectors[[4, 0, 1, 2, 3, 4]],
                                          **text_column(named, "image_paths"), "config": np.array("{}")})
    embedded = paired_features(tmp_path / "out", tmp_path / "captions.npz")
    np.testing.assert_array_equal(embedded.images, vectors)
    assert embedded.owner.tolist() == [4, 0, 1, 2, 3, 4] and embedded.source["checkpoint_sha256"] == "c"

# --------------------------------------------------------------------------- whole commands, several processes

@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pth.tar", TINY, tiny_world, SIZE)


def launch(checkpoint: Path, pattern: str, out: Path, rank: int = 0, world: int = 1) -> subprocess.Popen:
    return launch_rank("image_features_extraction.py", ["-p", str(checkpoint), "-d", pattern, "-o", str(out),
                                                        "--batch-size", "2", "--workers", "1"], rank, world)


@pytest.mark.slow
def test_two_ranks_and_a_killed_rank_give_the_vectors_of_one_process(
        tiny_checkpoint: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    shards, per_shard = 5, 6
    pattern = image_tars(tmp_path / "tars", shards, per_shard)
    finish(launch(tiny_checkpoint, pattern, tmp_path / "one"))
    reference = read_all(tmp_path / "one", shards)
    assert reference.shape == (30, 32) and reference.dtype == np.float16

    out = tmp_path / "two"
    victim, other = (launch(tiny_checkpoint, pattern, out, rank, 2) for rank in range(2))
    done, deadline = out / "done", time.monotonic() + 300
    while not (done.is_dir() and any(done.glob("00000[024].json"))) and victim.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)  # rank 0 has finished one of its shards 0, 2, 4
    victim.communicate()
    finish(other)
    assert len(list(done.glob("00000[024].json"))) < 3, "rank 0 finished before it was killed: nothing tested"
    output = finish(launch(tiny_checkpoint, pattern, out, 0, 2))  # rank 0 again: it resumes
    assert "already done" in output
    np.testing.assert_array_equal(read_all(out, shards), reference)  # two ranks, one killed, == one process

    assert run_in_process("search.py", ["--images", out, "--image", 7, "-k", 2, "--json", "-"], tiny_world,
                          monkeypatch) == 0
    found = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    scores = reference.astype(np.float32) @ reference[7].astype(np.float32)
    scores[7] = -np.inf  # the query image itself is left out
    expected = [f"{tmp_path / 'tars' / f'{row // per_shard:06d}.tar'}:s{row // per_shard}/{row % per_shard:04d}.jpg"
                for row in np.argsort(-scores, kind="stable")[:2]]
    assert [entry["path"] for entry in found] == expected
