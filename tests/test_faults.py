"""Nothing lost, nothing half-written: very long and odd text lines, full disks and read-only folders, crafted
feature files, decompression bombs and two processes on one extraction."""
from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors
from PIL import Image

import image_features_extraction
import localize
import search as search_cli
import text_features_extraction
from misc import cli
from misc.collections import extraction
from misc.store import files, locks
from misc.store.arrays import TextColumn, npz_array, text_array, write_npz
from misc.store.checkpoint import atomic_save
from misc.config import TrainConfig
from misc.eval.encode import caption_batches, encode_captions
from misc.errors import UserError
from misc.data.images import read_image
from misc.inference import Inference
from misc.collections.search import load_collection
from misc.data.words import WordVectors
from models.config import ModelConfig
from models.joint import build_model
from models.text import TextEncoder
from tests.conftest import ROOT, run_cli
from tests.test_extraction import one_thread, png_header_only  # noqa: F401 - one_thread: autouse fixture

VOCABULARY = ["a", "red", "blue", "circle", "square", "on", "the", "left", "UNK"]
DIM = 8


def vectors() -> KeyedVectors:
    keyed = KeyedVectors(vector_size=DIM)
    keyed.add_vectors(VOCABULARY, np.random.default_rng(0).standard_normal((len(VOCABULARY), DIM)).astype(np.float32))
    return keyed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model (resnet18 trunk, 8-d space, 2 SRU layers) and its own word vectors."""
    folder = tmp_path_factory.mktemp("model")
    vectors().save_word2vec_format(str(folder / "words.bin"), binary=True)
    torch.manual_seed(1)
    model = ModelConfig(trunk="resnet18", maps_dim=16, embed_dim=DIM, weldon_k=0.2, word_dim=DIM, sru_layers=2)
    config = {"model": asdict(model), "train": asdict(TrainConfig(dataset="demo", test_size=64)),
              "word_vectors": str(folder / "words.bin")}
    atomic_save({"format": "dsve-loc", "version": 1, "config": config, "model": build_model(model).state_dict(),
                 "epoch": 0, "best_rsum": 0.0, "metrics": {}}, folder / "tiny.pth.tar")
    return folder / "tiny.pth.tar"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of five small photos."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(2)
    for number in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"photo{number}.png")
    return folder


@pytest.fixture
def bomb(tmp_path: Path) -> Path:
    """A decompression bomb: a PNG declaring 20000 x 20000 pixels."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    return path


def main_of(module: ModuleType, *args: object) -> int:
    """Run a CLI's main through misc.cli.run in this process; returns its exit status."""
    try:
        cli.run(module.main, [str(arg) for arg in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes anywhere under ``folder``."""
    return sorted(path.name for path in folder.rglob("*.tmp*"))


# --------------------------------------------------------------------------- long lines, verbatim lines

def test_caption_batches_are_sorted_by_length_within_a_token_budget():
    words = WordVectors(vectors(), Path("words"))
    rng = np.random.default_rng(3)
    captions = [" ".join(rng.choice(VOCABULARY[:-1], rng.integers(1, 30))) for _ in range(200)]
    captions[57] = "red " * 5000
    seen, batches = [], list(caption_batches(captions, words, batch_size=8, max_tokens=64))
    for positions, encoded in batches:
        count, longest = encoded.words.shape[:2]
        assert count == len(positions) <= 8 and (count * longest <= 64 or count == 1)
        assert encoded.lengths.tolist() == [len(words.tokens(captions[p])) for p in positions]
        assert encoded.lengths.tolist() == sorted(encoded.lengths.tolist())
        seen += positions
    assert sorted(seen) == list(range(len(captions)))
    assert max(e.words.shape[0] * e.words.shape[1] for _, e in batches) == 5000  # the long line, alone
    with pytest.raises(ValueError, match="caption 130 has no words"):
        list(caption_batches(captions[:130] + ["  "] + captions[130:], words, 8))


@pytest.mark.slow
def test_a_1mb_line_among_short_ones_is_embedded_alone_and_every_line_round_trips_verbatim(checkpoint, tmp_path,
                                                                                            monkeypatch, capsys):
    long_line = ("a red\x00circle ünïcödé ✓ 🚲 on the left " * 40000)[:1_000_000]
    lines = ["a red circle", "\x00leading NUL", "trailing NUL\x00", "mid\x00dle", "\x00\x00",
             "tab\tand a bare CR\r", "ünïcödé ✓ 🚲 square", long_line] + [f"a blue square {i}" for i in range(40)]
    (tmp_path / "captions.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\n\n")
    padded: list[int] = []
    forward = TextEncoder.forward
    monkeypatch.setattr(TextEncoder, "forward",
                        lambda self, words, lengths: padded.append(words.shape[0] * words.shape[1]) or
                        forward(self, words, lengths))
    out = tmp_path / "captions.npz"
    assert main_of(text_features_extraction, "-p", checkpoint, "-d", tmp_path / "captions.txt", "-o", out,
                   "--batch-size", "16", "--max-tokens", "100", "--no-progress", "--device", "cpu") == 0
    long_tokens = len(WordVectors(vectors(), Path("w")).tokens(long_line))
    assert max(padded) == long_tokens and sorted(padded)[-2] <= 100  # today: 16 x the long line, per batch
    assert TextColumn(out, "lines").tolist() == lines
    assert npz_array(out, "line_numbers").tolist() == list(range(1, len(lines) + 1))
    model = Inference.load(checkpoint, device="cpu")
    alone = torch.cat([encode_captions(model.model, [line], model.words, "cpu", progress=False) for line in lines])
    np.testing.assert_allclose(npz_array(out, "features"), alone.numpy(), rtol=0, atol=1e-6)


def test_fixed_width_text_refuses_what_it_would_lose():
    assert text_array(["\x00lead", "mid\x00dle"]).tolist() == ["\x00lead", "mid\x00dle"]
    with pytest.raises(ValueError, match="ends in NUL"):
        text_array(["trail\x00"])


# --------------------------------------------------------------------------- full disks, read-only folders

def fill_disk(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """From now on, writing the .npz ``target`` (a file name) fails as on a full disk, half of a block written."""
    write = zipfile._ZipWriteFile.write

    def full(member: zipfile._ZipWriteFile, data: bytes) -> int:
        if Path(member._zipfile.filename).name.startswith(f".{target}."):  # the temporary file of ``target``
            write(member, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(member, data)

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", full)


@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "no space left on the device; free some space"),
                                        (errno.EDQUOT, "disk quota exceeded"),
                                        (errno.EROFS, "read-only file system; write to another folder"),
                                        (errno.EACCES, "permission denied; write to a folder you may write to")])
def test_write_json_that_fails_leaves_the_old_file_and_says_what_to_do(code, said, tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.write_json(path, {"old": 1})

    def failing(self: Path, data: str, **_: object) -> None:
        if code == errno.ENOSPC:  # a full disk: the file exists, half written
            self.write_bytes(data[:len(data) // 2].encode())
            raise OSError(code, os.strerror(code))
        raise OSError(code, os.strerror(code), str(self))  # the folder refuses the file itself

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(UserError) as error:
        files.write_json(path, {"new": 2})
    assert str(error.value).startswith(f"cannot write {path}: {said}") and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert path.read_text() == '{\n  "old": 1\n}\n'


def test_other_errors_and_errors_about_other_files_pass_unchanged(tmp_path):
    with pytest.raises(OSError, match="Input/output error"), files.atomic_path(tmp_path / "a.json"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    with pytest.raises(PermissionError), files.atomic_path(tmp_path / "b.json"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "an_input.txt"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_sync_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append(
        "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file") or fsync(fd))
    monkeypatch.setattr(files.os, "replace", lambda *paths: events.append("rename") or replace(*paths))
    files.write_json(tmp_path / "x.json", [1])
    assert events == ["file", "rename", "folder"] and (tmp_path / "x.json").read_text() == "[\n  1\n]\n"


@pytest.mark.slow
def test_text_extraction_on_a_full_disk_exits_2_in_one_line_and_leaves_nothing(checkpoint, tmp_path, monkeypatch,
                                                                                capsys):
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "captions.npz"
    fill_disk(monkeypatch, out.name)
    assert main_of(text_features_extraction, "-p", checkpoint, "-d", tmp_path / "captions.txt", "-o", out,
                   "--no-progress", "--device", "cpu") == 2
    assert error_lines(capsys) == [f"error: cannot write {out}: no space left on the device; free some space (or "
                                   f"write to another disk) and run again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt"]


@pytest.mark.slow
def test_image_extraction_on_a_full_disk_keeps_its_finished_parts_and_resumes_to_the_same_file(
        checkpoint, photos, tmp_path, monkeypatch, capsys):
    options = ["-p", checkpoint, "-d", photos, "--chunk-size", "2", "--batch-size", "2", "--workers", "0",
               "--no-progress", "--device", "cpu"]
    assert main_of(image_features_extraction, *options, "-o", tmp_path / "reference.npz") == 0
    out = tmp_path / "out.npz"
    parts = tmp_path / "out.npz.parts"
    with monkeypatch.context() as patch:
        fill_disk(patch, "part-000001.npz")
        assert main_of(image_features_extraction, *options, "-o", out) == 2
    assert error_lines(capsys) == [f"error: cannot write {parts / 'part-000001.npz'}: no space left on the device; "
                                   f"free some space (or write to another disk) and run again"]
    assert sorted(p.name for p in parts.iterdir()) == ["lock", "manifest.json", "part-000000.npz"]
    with monkeypatch.context() as patch:
        fill_disk(patch, "out.npz")  # the parts fit, the assembled file does not
        assert main_of(image_features_extraction, *options, "-o", out, "--resume") == 2
    assert error_lines(capsys) == [f"error: cannot write {out}: no space left on the device; free some space (or "
                                   f"write to another disk) and run again"]
    assert not out.exists() and sorted(p.name for p in parts.glob("part-*")) == [f"part-00000{i}.npz" for i in range(3)]
    assert leftovers(tmp_path) == []
    assert main_of(image_features_extraction, *options, "-o", out, "--resume") == 0
    with np.load(out) as got, np.load(tmp_path / "reference.npz") as expected:
        assert got.files == expected.files
        for name in expected.files:
            np.testing.assert_array_equal(got[name], expected[name])
    assert not parts.exists() and leftovers(tmp_path) == []


def test_a_read_only_output_folder_stops_an_extraction_before_any_work(tmp_path, monkeypatch):
    def refused(path: Path, *_: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(locks, "open", refused, raising=False)  # the lock file is the run's first write
    out = tmp_path / "out.npz"
    said = f"cannot write {out}.parts: read-only file system; write to another folder"
    with pytest.raises(UserError, match=re.escape(said)):
        extraction.PartStore(out).start(extraction.run_manifest("0" * 64, 64, False, ["a.png"], 5), resume=False)


def test_search_json_on_a_full_disk_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    features = np.eye(3, DIM, dtype=np.float32)
    write_npz(tmp_path / "images.npz", {"features": features, "paths": np.array(["a.png", "b.png", "c.png"])})

    def full(self: Path, data: str, **_: object) -> None:
        self.write_bytes(data.encode()[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "found.json"
    assert main_of(search_cli, "--images", tmp_path / "images.npz", "--image", "0", "--json", out) == 2
    assert error_lines(capsys) == [f"error: cannot write {out}: no space left on the device; free some space (or "
                                   f"write to another disk) and run again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npz"]


# --------------------------------------------------------------------------- crafted feature files

def crafted(path: Path, pickled: str) -> Path:
    """A text feature file as the extraction writes it, but with ``pickled`` holding a pickled object array that,
    once unpickled, would write ``ran.txt`` beside it."""
    arrays = {"features": np.eye(2, DIM, dtype=np.float32), "lines_utf8": np.frombuffer(b"ab", np.uint8),
              "lines_offsets": np.array([0, 1, 2]), "line_numbers": np.array([1, 2]), "config": np.array("{}")}
    arrays[pickled] = np.array([Payload(path.with_name("ran.txt")), None], dtype=object)
    np.savez(path, **arrays)
    return path


class Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return Path.write_text, (self.target, "ran")


@pytest.mark.parametrize("member", ["features", "lines_utf8", "lines_offsets", "line_numbers", "config"])
def test_a_feature_file_with_pickled_members_is_refused_naming_the_member(member, tmp_path):
    path = crafted(tmp_path / "texts.npz", member)
    with pytest.raises(UserError) as error:
        load_collection(path)
    assert str(error.value).startswith(f"{path}: array '{member}' holds Python objects")
    assert "\n" not in str(error.value) and not (tmp_path / "ran.txt").exists()


@pytest.mark.parametrize("damage", ["truncated", "offsets", "rows", "header"])
def test_a_damaged_feature_file_is_one_line(damage, tmp_path):
    path = tmp_path / "texts.npz"
    arrays = {"features": np.eye(2, DIM, dtype=np.float32), "lines_utf8": np.frombuffer(b"ab", np.uint8),
              "lines_offsets": np.array([0, 1, 2]), "line_numbers": np.array([1, 2])}
    if damage == "offsets":
        arrays["lines_offsets"] = np.array([0, 5, 2])
    if damage == "rows":
        arrays["line_numbers"] = np.array([1, 2, 3])
    write_npz(path, arrays)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    if damage == "header":
        path.write_bytes(raw.replace(b"\x93NUMPY", b"\x93NUMPX", 1))
    with pytest.raises(UserError) as error:
        load_collection(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_search_refuses_a_pickled_feature_file_in_one_line(tmp_path, capsys):
    path = crafted(tmp_path / "texts.npz", "features")
    assert main_of(search_cli, "--images", path, "--image", "0") == 2
    assert error_lines(capsys) == [f"error: {path}: array 'features' holds Python objects (pickled data, which "
                                   f"could run code when loaded): refused; feature files hold numbers and text only, "
                                   f"make it again with the extraction commands"]
    assert not (tmp_path / "ran.txt").exists()


# --------------------------------------------------------------------------- decompression bombs

def test_every_reader_of_user_images_refuses_a_decompression_bomb(bomb):
    with pytest.raises(UserError, match="cannot read it as an image .DecompressionBombError") as error:
        read_image(bomb)
    assert str(error.value).startswith(str(bomb)) and "\n" not in str(error.value)
    assert extraction.ImageFiles(bomb.parent, [bomb.name], 64)[0][2].startswith("DecompressionBombError")


@pytest.mark.slow
def test_search_and_localize_refuse_a_bomb_in_one_line(checkpoint, bomb, tmp_path, capsys):
    write_npz(tmp_path / "images.npz", {"features": np.eye(2, DIM, dtype=np.float32), "paths": np.array(["a", "b"])})
    assert main_of(search_cli, "--images", tmp_path / "images.npz", "-p", checkpoint, "--image", bomb,
                   "--device", "cpu") == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: {bomb}: cannot read it as an image (DecompressionBombError: Image size")
    assert main_of(localize, "-p", checkpoint, "-i", bomb, "-t", "a red circle", "-o", tmp_path / "map.png",
                   "--device", "cpu") == 2
    assert error_lines(capsys) == [line] and not (tmp_path / "map.png").exists()


# --------------------------------------------------------------------------- two processes

@pytest.mark.slow
def test_a_second_process_is_refused_while_the_first_holds_the_extraction(checkpoint, photos, tmp_path):
    out = tmp_path / "out.npz"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from misc.collections.extraction import PartStore, run_manifest; "
         "store = PartStore(sys.argv[1]); store.start(run_manifest('0' * 64, 64, False, ['a.png'], 2), resume=False); "
         "print('holding', flush=True); sys.stdin.read()", str(out)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        second = run_cli("image_features_extraction.py", "-p", str(checkpoint), "-d", str(photos), "-o", str(out),
                         "--resume", "--workers", "0", "--no-progress", "--device", "cpu", check=False)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {out}.parts is in use by process {holder.pid} on {socket.gethostname()} (python); let it "
            f"finish, or stop it and run again with --resume")
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not out.exists()
    manifest = extraction.run_manifest("0" * 64, 64, False, ["a.png"], 2)
    store = extraction.PartStore(out)
    assert store.start(manifest, resume=True) == manifest  # the lock went with the process
    store.close()
