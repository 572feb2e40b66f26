"""Feature extraction and search: odd image files, odd text lines, resumable runs, exact vs faiss search, and the
three CLIs end to end on a tiny random-weight checkpoint."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from misc.collections import extraction
from models.config import ModelConfig
from misc.data.datasets import eval_transform
from misc.eval.encode import encode_captions
from misc.store.arrays import Streamed, TextColumn, npz_array, text_column, write_npz
from misc.collections.extraction import ImageFiles, PartStore, collate_images, extract_images
from misc.data.images import decode_image, list_images, read_list
from misc.collections import index as faiss_index
from misc.collections.index import build_index, index_search, load_or_build_index
from misc.collections.search import exact_search, load_collection
from misc.collections.texts import read_text_lines
from misc.data.words import load_word_vectors
from tests.conftest import load_model, random_checkpoint, run_cli

SIZE = 64
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # on a shared 2-core machine, 2 contended threads are slower than 1
GOOD = ["cmyk.jpg", "grey.png", "la.png", "large.jpg", "nested/deeper/UPPER.JPG", "nested/photo.webp",
        "one_pixel.bmp", "palette.png", "rgb.jpeg", "rgba.png", "sixteen.png"]
BAD = {"bomb.png": "DecompressionBombError", "empty.jpg": "empty file", "random.jpg": "UnidentifiedImageError",
       "truncated.jpg": "truncated"}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds none: PIL's decompression-bomb check fires on open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(script: str, *args: object, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(script, *map(str, args), check=check, env=ONE_THREAD)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images in every awkward form, nested folders, bad files and a file that is no image."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    photo.save(root / "rgb.jpeg", quality=90)
    photo.save(root / "nested" / "deeper" / "UPPER.JPG")
    photo.save(root / "nested" / "photo.webp")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    photo.convert("L").save(root / "grey.png")
    photo.convert("LA").save(root / "la.png")
    Image.fromarray(np.array([[0, 32896, 65535]] * 3, dtype=np.uint16)).save(root / "sixteen.png")  # mode I;16
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # left half opaque red, right half transparent black
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(root / "palette.png", transparency=0)  # black entries transparent
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "one_pixel.bmp")
    Image.new("RGB", (4000, 3000), (90, 120, 150)).save(root / "large.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes((root / "rgb.jpeg").read_bytes()[:300])
    (root / "random.jpg").write_bytes(rng.bytes(2000))
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint of a tiny model (resnet18, 32-d), with the tiny world's word vectors."""
    torch.manual_seed(0)
    model_config = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pth.tar", model_config, tiny_world, SIZE)


@pytest.fixture(scope="module")
def demo_features(tiny_world: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image features (with maps) of the tiny world's val2014 images, made by the CLI."""
    out = tmp_path_factory.mktemp("features") / "images.npz"
    cli("image_features_extraction.py", "-p", tiny_checkpoint, "-d", tiny_world / "images" / "val2014", "-o", out,
        "--maps", "--batch-size", "5", "--chunk-size", "7", "--workers", "1", "--no-progress", "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def demo_texts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Text features of a caption file with an empty line, invalid UTF-8, an unknown word and a line of unknown
    words, made by the CLI; and what the CLI printed."""
    folder = tmp_path_factory.mktemp("texts")
    (folder / "captions.txt").write_bytes(b"A red circle on the left\n\nA blue \xff square\n"
                                          b"A frobnicated red square\nqwxz zzkq\n")
    result = cli("text_features_extraction.py", "-p", tiny_checkpoint, "-d", folder / "captions.txt",
                 "-o", folder / "captions.npz", "--no-progress", "--device", "cpu")
    return folder / "captions.npz", result.stderr


def test_listing_is_recursive_case_insensitive_sorted_and_ignores_other_files(zoo):
    assert list_images(zoo) == sorted(GOOD + list(BAD))


def test_list_file_takes_relative_and_absolute_paths_in_order(zoo, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"rgba.png\n\n{zoo / 'nested' / 'photo.webp'}\nmissing.jpg\nrgba.png\n/elsewhere/x.png\n")
    assert read_list(listing, zoo) == ["rgba.png", "nested/photo.webp", "missing.jpg", "/elsewhere/x.png"]


def test_decoding_policy(zoo):
    pixels = {name: np.asarray(decode_image(zoo / name, SIZE)) for name in GOOD}
    assert all(image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 for image in pixels.values())
    np.testing.assert_array_equal(pixels["sixteen.png"][0, :, 0], [0, 128, 255])  # scaled by 1/257, not clipped
    np.testing.assert_array_equal(pixels["rgba.png"][0, 0], [255, 0, 0])
    np.testing.assert_array_equal(pixels["rgba.png"][0, 7], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(pixels["palette.png"][0], [[255, 255, 255], [0, 0, 255]])
    np.testing.assert_array_equal(pixels["one_pixel.bmp"], [[[10, 200, 30]]])
    height, width = pixels["large.jpg"].shape[:2]
    assert (width, height) == (500, 375)  # decoded at 1/8 scale: still >= SIZE on both sides
    assert np.abs(pixels["large.jpg"].astype(int) - (90, 120, 150)).max() <= 2


def test_bad_files_are_reported_and_do_not_kill_loader_workers(zoo):
    entries = list_images(zoo) + ["does/not/exist.png"]
    loader = DataLoader(ImageFiles(zoo, entries, SIZE), batch_size=4, num_workers=2, collate_fn=collate_images)
    decoded, failures = [], {}
    for batch in loader:
        assert batch.images.shape[1:] == (3, SIZE, SIZE) or len(batch.indices) == 0
        decoded += list(batch.indices)
        failures.update({entries[index]: reason for index, reason in batch.failures})
    assert sorted(entries[index] for index in decoded) == sorted(GOOD)
    assert set(failures) == set(BAD) | {"does/not/exist.png"}
    for name, expected in BAD.items():
        assert expected.lower() in failures[name].lower(), failures[name]
    assert failures["does/not/exist.png"] == "file not found"


@pytest.mark.slow
def test_image_cli_embeds_the_zoo_and_lists_what_it_skipped(zoo, tiny_checkpoint, tmp_path):
    out = tmp_path / "zoo.npz"
    result = cli("image_features_extraction.py", "-p", tiny_checkpoint, "-d", zoo, "-o", out, "--workers", "2",
                 "--batch-size", "4", "--chunk-size", "5", "--no-progress", "--device", "cpu")
    assert f"{len(GOOD)} images embedded, {len(BAD)} skipped" in result.stderr
    with np.load(out) as data:
        assert data["paths"].tolist() == sorted(GOOD)
        np.testing.assert_allclose(np.linalg.norm(data["features"], axis=1), 1, atol=1e-5)
        assert data["features"].dtype == np.float32 and data["features"].shape == (len(GOOD), 32)
        assert dict(data["skipped"].tolist()).keys() == BAD.keys()
        config = json.loads(str(data["config"]))
    assert config["model"]["embed_dim"] == 32 and config["size"] == SIZE and len(config["checkpoint_sha256"]) == 64
    assert not (tmp_path / "zoo.npz.parts").exists()


@pytest.mark.slow
def test_image_features_equal_direct_model_embeddings(demo_features, tiny_world, tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    folder = tiny_world / "images" / "val2014"
    with np.load(demo_features) as data:
        paths, features, maps = data["paths"].tolist(), data["features"], data["maps"]
    assert paths == sorted(p.name for p in folder.glob("*.jpg"))
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    rows = [0, len(paths) - 1]
    images = torch.stack([eval_transform(SIZE)(decode_image(folder / paths[row], exif=False)) for row in rows])
    with torch.no_grad():
        expected_maps = model.image.feature_maps(images)
        expected = model.image.embed_maps(expected_maps)
    np.testing.assert_allclose(features[rows], expected.numpy(), atol=1e-5)
    assert maps.dtype == np.float16 and maps.shape == (len(paths), 32, 2, 2)
    np.testing.assert_allclose(maps[rows].astype(np.float32), expected_maps.numpy(), rtol=2e-3, atol=2e-3)


def test_resume_after_interruption_gives_the_uninterrupted_result(zoo, tiny_checkpoint, tmp_path, monkeypatch):
    model = load_model(tiny_checkpoint)
    entries = list_images(zoo)
    record = {"checkpoint_sha256": "x" * 64}
    options = {"device": torch.device("cpu"), "batch_size": 3, "workers": 0, "chunk_size": 5, "maps": True,
               "progress": False}
    reference = extract_images(model.image, zoo, entries, tmp_path / "reference.npz", SIZE, record, **options)

    out = tmp_path / "out.npz"
    saved = PartStore.save

    def crash_on_second_part(store: PartStore, chunk: int, arrays: dict) -> None:
        if chunk == 1:
            raise KeyboardInterrupt  # as if the run was stopped while chunk 1 was being flushed
        saved(store, chunk, arrays)

    monkeypatch.setattr(PartStore, "save", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        extract_images(model.image, zoo, entries, out, SIZE, record, **options)
    monkeypatch.setattr(PartStore, "save", saved)
    assert not out.exists() and sorted(p.name for p in PartStore(out).folder.iterdir()) == [
        "lock", "manifest.json", "part-000000.npz"]

    with pytest.raises(extraction.UserError, match="unfinished run; pass --resume"):
        extract_images(model.image, zoo, entries, out, SIZE, record, **options)
    decoded = []
    decode = extraction.decode_image
    monkeypatch.setattr(extraction, "decode_image", lambda path, size: decoded.append(path) or decode(path, size))
    resumed = extract_images(model.image, zoo, entries, out, SIZE, record, resume=True, **options)
    assert resumed.resumed_chunks == 1 and len(decoded) == len(entries) - 5  # chunk 0 was not recomputed
    assert (resumed.count, resumed.skipped) == (reference.count, reference.skipped)
    with np.load(out) as got, np.load(tmp_path / "reference.npz") as expected:
        assert got.files == expected.files
        for name in expected.files:
            np.testing.assert_array_equal(got[name], expected[name])
    assert not PartStore(out).folder.exists()


@pytest.mark.slow
def test_resume_refuses_parts_made_with_other_settings(zoo, tiny_checkpoint, tmp_path):
    out = tmp_path / "out.npz"
    manifest = extraction.run_manifest(extraction.model_sha256(tiny_checkpoint), SIZE, False, list_images(zoo), 5)
    PartStore(out).start(manifest, resume=False)  # as an interrupted run with these settings leaves it
    for change, what in (({"size": 96}, "different image size"), ({"maps": True}, "different --maps setting"),
                         ({"files_sha256": "0" * 64}, "different file list"),
                         ({"checkpoint_sha256": "0" * 64}, "different checkpoint")):
        with pytest.raises(extraction.UserError, match=what):
            PartStore(out).start({**manifest, **change}, resume=True)
    assert PartStore(out).start({**manifest, "chunk_size": 9}, resume=True)["chunk_size"] == 5  # parts keep theirs
    result = cli("image_features_extraction.py", "-p", tiny_checkpoint, "-d", zoo, "-o", out, "--resume", "--size",
                 "96", "--workers", "0", "--no-progress", "--device", "cpu", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: cannot resume")
    assert "different image size (64 vs 96 now)" in result.stderr and not out.exists()


def test_text_lines_policy(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"\xef\xbb\xbfA red circle\r\n\n   \nA blue \xff square\nA green square\n")
    text = read_text_lines(path)
    assert text.lines == ["A red circle", "A green square"] and text.numbers == [1, 5]
    assert text.skipped == [(2, "empty line"), (3, "empty line"), (4, "invalid UTF-8 at byte 7")]


@pytest.mark.slow
def test_text_cli_end_to_end(demo_texts, tiny_world, tiny_checkpoint):
    out, printed = demo_texts
    assert "2 lines embedded, 3 skipped; out-of-vocabulary words: 1 of 10" in printed
    assert "captions.txt:3: invalid UTF-8 at byte 7" in printed
    assert TextColumn(out, "lines").tolist() == ["A red circle on the left", "A frobnicated red square"]
    with np.load(out) as data:
        assert data["line_numbers"].tolist() == [1, 4] and data["oov"].tolist() == [0, 1]
        assert data["skipped"].tolist() == [["2", "empty line"], ["3", "invalid UTF-8 at byte 7"],
                                            ["5", "no word in the vocabulary (zero embedding)"]]
        features = data["features"]
    model = load_model(tiny_checkpoint)
    words = load_word_vectors(tiny_world / "words" / "demo_word2vec.bin")
    expected = encode_captions(model, ["A red circle on the left", "A frobnicated red square"], words, "cpu",
                               progress=False)
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)


def test_streamed_npz_round_trip_and_memory_map(tmp_path):
    blocks = [np.arange(6, dtype=np.float32).reshape(2, 3), np.empty((0, 3), np.float32),
              np.arange(6, 9, dtype=np.float32).reshape(1, 3)]
    path = tmp_path / "x.npz"
    write_npz(path, {"features": Streamed((3, 3), np.float32, lambda: iter(blocks)), "names": np.array(["a", "b"])})
    with np.load(path) as data:
        np.testing.assert_array_equal(data["features"], np.arange(9, dtype=np.float32).reshape(3, 3))
    mapped = npz_array(path, "features", mmap=True)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, np.arange(9, dtype=np.float32).reshape(3, 3))
    with pytest.raises(ValueError, match="2 rows written"):
        write_npz(tmp_path / "y.npz", {"features": Streamed((3, 3), np.float32, lambda: iter(blocks[:1]))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]  # no temporary file left behind


def random_unit(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_search_agrees_with_full_sort_and_faiss():
    features, queries = random_unit(3000, 24, 0), random_unit(20, 24, 1)
    order = np.argsort(-(queries @ features.T), axis=1, kind="stable")[:, :10]
    scores, rows = exact_search(queries, features, 10, rows_per_step=700)
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ features.T, order, 1), rtol=1e-6)
    for nlist, nprobe in ((1, None), (16, 16)):  # flat, and IVF visiting every list: both exact
        index = build_index(features, "Flat" if nlist == 1 else f"IVF{nlist},Flat")
        faiss_scores, faiss_rows = index_search(index, queries, 10, nprobe)
        np.testing.assert_array_equal(faiss_rows, order)
        np.testing.assert_allclose(faiss_scores, scores, atol=1e-5)
    ivf_rows = index_search(build_index(features, "IVF16,Flat"), queries, 10, 4)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf_rows, order)]) > 0.3


def test_faiss_index_is_saved_reused_and_rebuilt_when_features_change(tmp_path):
    path = tmp_path / "images.npz"
    write_npz(path, {"features": random_unit(200, 8, 0), "paths": np.array([f"{i}.jpg" for i in range(200)])})
    assert load_or_build_index(load_collection(path))[1] is True
    assert (tmp_path / "images.npz.faiss").exists() and (tmp_path / "images.npz.faiss.json").exists()
    assert (tmp_path / "images.npz.index_report.json").exists()
    assert load_or_build_index(load_collection(path))[1] is False
    write_npz(path, {"features": random_unit(200, 8, 1), "paths": np.array([f"{i}.jpg" for i in range(200)])})
    index, built = load_or_build_index(load_collection(path))
    assert built is True
    np.testing.assert_array_equal(index_search(index, random_unit(1, 8, 2), 5)[1],
                                  exact_search(random_unit(1, 8, 2), random_unit(200, 8, 1), 5)[1])


@pytest.mark.slow
def test_search_cli_all_directions(demo_features, demo_texts, tiny_checkpoint):
    texts = demo_texts[0]
    with np.load(demo_features) as data:
        images, paths = data["features"], data["paths"].tolist()
    with np.load(texts) as data:
        lines = data["features"]

    result = cli("search.py", "--images", demo_features, "-p", tiny_checkpoint, "-q", "A frobnicated red square",
                 "-k", "5", "--index", "faiss", "--json", "-", "--device", "cpu")
    found = json.loads(result.stdout)
    best = np.argsort(-(images @ lines[1]), kind="stable")[:5]
    assert [r["path"] for r in found["queries"][0]["results"]] == [paths[i] for i in best]
    assert found["index"] == {"type": "faiss IndexFlat", "built": True} and "top 5 of 24 images" in result.stderr
    assert "1 of 4 query words are not in the vocabulary" in result.stderr
    assert "Loading faiss" not in result.stderr  # faiss's own CPU probing stays quiet

    result = cli("search.py", "--images", demo_features, "--texts", texts, "--image", "3", "-k", "2", "--json", "-")
    entries = json.loads(result.stdout)["queries"][0]["results"]
    assert [e["line_number"] for e in entries] == [[1, 4][i] for i in np.argsort(-(lines @ images[3]))]

    result = cli("search.py", "--images", demo_features, "--image", paths[3], "-k", "3", "--index", "faiss")
    assert paths[3] not in result.stdout.split("\n", 1)[1]  # an image is not its own neighbour
    assert result.stdout.splitlines()[1].endswith(paths[int(np.argsort(-(images @ images[3]))[1])])


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_skipped_with_a_report_and_the_rest_embedded(tiny_checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    photo.save(folder / "fine.jpg")
    photo.save(folder / os.fsdecode(b"caf\xe9.jpg"))  # Latin-1 bytes: not UTF-8
    out = tmp_path / "photos.npz"
    result = cli("image_features_extraction.py", "-p", tiny_checkpoint, "-d", folder, "-o", out, "--size", "64",
                 "--workers", "0", "--no-progress", "--device", "cpu")
    with np.load(out) as data:
        assert data["paths"].tolist() == ["fine.jpg"] and data["features"].shape[0] == 1
        assert data["skipped"].tolist() == [["caf\\xe9.jpg", "file name is not valid UTF-8; rename the file to "
                                                             "embed it"]]
    assert "1 images embedded, 1 skipped" in result.stderr


def test_a_second_process_on_the_same_extraction_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out.npz"
    manifest = extraction.run_manifest("0" * 64, SIZE, False, ["a.jpg"], 5)
    first = PartStore(out)
    first.start(manifest, resume=False)
    with pytest.raises(extraction.UserError, match=f"{out}.parts is in use by process {os.getpid()} on "):
        PartStore(out).start(manifest, resume=True)
    first.close()  # as when the first process ends, killed or not
    assert PartStore(out).start(manifest, resume=True) == manifest


def test_an_index_that_cannot_be_saved_is_still_searched(tmp_path, monkeypatch, caplog):
    path = tmp_path / "images.npz"
    features = random_unit(50, 8, 0)
    write_npz(path, {"features": features, "paths": np.array([f"{i}.jpg" for i in range(50)])})

    def read_only(index: object, name: str) -> None:
        raise RuntimeError(f"Error: fopen({name}, 'wb') failed: Read-only file system")

    monkeypatch.setattr(faiss_index.faiss, "write_index", read_only)
    index, built = load_or_build_index(load_collection(path))
    assert built and not list(tmp_path.glob("*.faiss*")) and "could not save the index" in caplog.text
    queries = random_unit(3, 8, 1)
    np.testing.assert_array_equal(index_search(index, queries, 5)[1], exact_search(queries, features, 5)[1])


@pytest.mark.parametrize("values", [[], ["a"], ["", "x\x00", "\x00\x00", "ünïcödé ✓ 🚲", "line\twith\rcontrol"],
                                    ["short", "y" * 1_000_000, "z"]])
def test_text_columns_round_trip_verbatim_at_their_own_length(values, tmp_path):
    path = tmp_path / "texts.npz"
    write_npz(path, text_column(values, "lines"))
    column = TextColumn(path, "lines")
    assert len(column) == len(values) and column.tolist() == values
    assert path.stat().st_size < sum(len(v.encode()) for v in values) + 2000  # no padding to the longest
