"""Feature extraction and search, shared by ``image_features_extraction.py``, ``text_features_extraction.py`` and
``search.py``.

- Listing: the images of a folder (recursive) or of a list file, as stable relative paths.
- Decoding: one policy for every odd file (see :func:`decode_image`); a file that cannot be decoded becomes a
  reported ``skipped`` entry, never an exception in a DataLoader worker.
- Resumable runs: results are flushed chunk by chunk to ``OUT.npz.parts/`` (:class:`PartStore`), checked against a
  manifest on ``--resume``, and assembled into ``OUT.npz`` (streamed, temporary file + rename) when every chunk is done.
- Feature files: plain uncompressed ``.npz`` files; :func:`npz_array` memory-maps an array inside one, so a
  collection of millions is searched without first reading it all into memory.
- Search: exact top-k by chunked matrix products, or a faiss index (inner product on unit vectors) saved next to the
  features with a fingerprint of them, rebuilt when stale.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import faiss
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from misc.cli import write_json
from misc.config import ConfigError
from misc.datasets import eval_transform
from misc.engine import autocast, encode_captions
from misc.files import atomic_path
from misc.words import WordVectors
from models.joint import JointEmbedding
from models.visual import ImageEncoder

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a browser shows them
PART_VERSION = 1
MAPS_DTYPE = np.float16  # G is only used for heatmaps (eq. 8); half precision halves the file
FLAT_BELOW = 100_000  # collections smaller than this get an exact faiss index


# --------------------------------------------------------------------------- listing

def list_images(folder: Path) -> list[str]:
    """Relative POSIX paths of every image under ``folder`` (recursive; extensions in :data:`IMAGE_EXTENSIONS`,
    any case), sorted. Symbolic links to folders are not followed (no cycles)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} not found")
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def read_list(list_file: Path, folder: Path) -> list[str]:
    """Entries of a list file, one path a line, relative to ``folder`` or absolute, in the file's order.

    Absolute paths inside ``folder`` are made relative to it; blank lines and repeated entries are dropped.
    Files that do not exist are kept: they are reported as skipped like any undecodable file.
    """
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"list file {list_file} could not be read ({error})") from error
    folder = Path(folder).resolve()
    entries: dict[str, None] = {}  # ordered set
    repeated = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        path = Path(line.strip())
        if path.is_absolute() and path.resolve().is_relative_to(folder):
            path = path.resolve().relative_to(folder)
        repeated += path.as_posix() in entries
        entries[path.as_posix()] = None
    if repeated:
        log.warning("%s: dropped %d repeated entries", list_file, repeated)
    return list(entries)


# --------------------------------------------------------------------------- decoding

def decode_image(path: Path, size: int) -> Image.Image:
    """Decode any image file into RGB, ready to be resized to ``size`` x ``size``; raise on undecodable files.

    Policy:
    - JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least ``size`` on both sides
      (``Image.draft``): a 40-megapixel photo costs little memory and time;
    - the EXIF orientation is applied;
    - 16-bit grey (``I;16``, ``I``) is scaled to 8 bits (value / 257), not clipped;
    - transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited onto white;
    - CMYK, grey, palette and bilevel images are converted by PIL;
    - empty files, unknown formats and truncated files raise; so do images above PIL's decompression-bomb limit
      (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels), which PIL refuses before decoding anything.
    """
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Between MAX_IMAGE_PIXELS and twice that PIL only warns; such images are decoded (JPEGs at reduced scale).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.draft(image.mode, (size, size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a decoded image, following the policy of :func:`decode_image`."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.rint(np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def failure_reason(error: Exception) -> str:
    """One line saying why a file was skipped."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class ImageFiles(Dataset):
    """Images of a file list for extraction; item ``i`` is ``(i, image (3, S, S) or None, reason or None)``.

    Decoding errors are caught here, in the worker, and returned as a reason: a bad file never kills a worker.
    """

    def __init__(self, folder: Path, entries: list[str], size: int) -> None:
        self.folder, self.entries, self.size = Path(folder), entries, size
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(decode_image(self.folder / self.entries[index], self.size)), None
        except Exception as error:  # any failure of one user file is reported, never fatal to the run
            return index, None, failure_reason(error)


@dataclass
class ImageBatch:
    """Decoded images of a batch and the failures among its files."""

    indices: torch.Tensor  # (B,) long, positions in the file list of the decoded images
    images: torch.Tensor  # (B, 3, S, S); (0,) when no file of the batch could be decoded
    failures: list[tuple[int, str]]  # (position, reason)

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader (``pin_memory=True``) for faster copies to a GPU."""
        return ImageBatch(self.indices, self.images.pin_memory(), self.failures)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    """Stack the decoded images, set the failures aside."""
    decoded = [(index, image) for index, image, _ in items if image is not None]
    failures = [(index, reason) for index, image, reason in items if image is None]
    indices = torch.tensor([index for index, _ in decoded], dtype=torch.long)
    images = torch.stack([image for _, image in decoded]) if decoded else torch.empty(0)
    return ImageBatch(indices, images, failures)


# --------------------------------------------------------------------------- embedding loop

@dataclass
class Timing:
    """Where an extraction's time went: waiting for the loader vs computing, per batch."""

    images: int = 0
    seconds: float = 0.0
    wait: list[float] = field(default_factory=list)  # seconds per batch spent waiting for the loader
    compute: list[float] = field(default_factory=list)  # seconds per batch in the model (incl. copy back)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@torch.no_grad()
def embed_image_batches(encoder: ImageEncoder, loader: Iterable[ImageBatch], device: torch.device,
                        amp: str | None = None, with_maps: bool = False, timing: Timing | None = None,
                        progress: bool = True) -> Iterator[tuple[ImageBatch, np.ndarray, np.ndarray | None]]:
    """Yield every batch with its unit embeddings (B, d) float32 and, with ``with_maps``, its maps G
    (B, D', h, w) in :data:`MAPS_DTYPE` (eq. 1 and 3). Time spent by the consumer is not counted in ``timing``."""
    encoder.eval()
    timing = timing if timing is not None else Timing()
    embed_dim = encoder.proj.out_features
    start = tick = time.perf_counter()
    for batch in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        began = time.perf_counter()
        timing.wait.append(began - tick)
        maps = None
        if len(batch.indices):
            with autocast(device, amp):
                grids = encoder.feature_maps(batch.images.to(device, non_blocking=True))  # (B, D', h, w)
                features = encoder.embed_maps(grids).float().cpu().numpy()  # (B, d)
            if with_maps:
                maps = grids.to(torch.float16).cpu().numpy()
        else:
            features = np.empty((0, embed_dim), dtype=np.float32)
        timing.compute.append(time.perf_counter() - began)
        timing.images += len(batch.indices)
        paused = time.perf_counter()
        yield batch, features, maps
        tick = time.perf_counter()
        start += tick - paused  # the consumer's time (writing parts) is not extraction time
    timing.seconds += time.perf_counter() - start


def map_side(size: int) -> int:
    """Side of the maps G for a ``size`` x ``size`` input: a ResNet halves it (rounding up) five times."""
    for _ in range(5):
        size = (size + 1) // 2
    return size


def maps_bytes(count: int, maps_dim: int, size: int) -> int:
    """Bytes the maps G of ``count`` images take in the output (:data:`MAPS_DTYPE`)."""
    return count * maps_dim * map_side(size) ** 2 * np.dtype(MAPS_DTYPE).itemsize


# --------------------------------------------------------------------------- .npz files

@dataclass
class Streamed:
    """An array written to an .npz chunk by chunk: its full shape, dtype and a function yielding the row blocks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterable[np.ndarray]]


def write_npz(path: Path, arrays: dict[str, np.ndarray | Streamed]) -> None:
    """Write an uncompressed .npz (what ``np.load`` reads) atomically: temporary file in the same folder, then rename.

    :class:`Streamed` arrays are written block by block, so an output larger than memory can be assembled.
    """
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED,
                                                        allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                if isinstance(value, Streamed):
                    _write_streamed(member, value, name)
                else:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def _write_streamed(member: Any, value: Streamed, name: str) -> None:
    dtype = np.dtype(value.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(value.shape)}
    np.lib.format.write_array_header_2_0(member, header)
    rows = 0
    for block in value.blocks():
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.shape[1:] != tuple(value.shape[1:]):
            raise ValueError(f"{name}: block of shape {block.shape} in an array of shape {value.shape}")
        member.write(block.tobytes())
        rows += len(block)
    if rows != value.shape[0]:
        raise ValueError(f"{name}: {rows} rows written for an array of shape {value.shape}")


def npz_array(path: Path, name: str, mmap: bool = False) -> np.ndarray:
    """One array of an .npz; with ``mmap`` an uncompressed one is memory-mapped (read-only) instead of read."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if not mmap or info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the member's local header: name and extra-field lengths at bytes 26-29
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {name} holds Python objects")
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def npz_names(path: Path) -> set[str]:
    """Names of the arrays an .npz holds."""
    with zipfile.ZipFile(path) as archive:
        return {name[:-4] for name in archive.namelist() if name.endswith(".npy")}


def npz_fingerprint(path: Path) -> str:
    """A content fingerprint of an .npz that reads only its directory: every member's name, size and CRC-32."""
    with zipfile.ZipFile(path) as archive:
        entries = sorted((i.filename, i.file_size, i.CRC) for i in archive.infolist())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_array(values: list[str]) -> np.ndarray:
    """Strings as a fixed-width unicode array (loads without pickle); an empty list keeps a width of 1."""
    return np.array(values, dtype=str) if values else np.empty(0, dtype="<U1")


def skipped_array(skipped: list[tuple[str, str]]) -> np.ndarray:
    """(K, 2) strings: where (a path or a line number) and why."""
    return np.array(skipped, dtype=str).reshape(-1, 2) if skipped else np.empty((0, 2), dtype="<U1")


def log_skipped(skipped: list[tuple[str, str]], out: Path, shown: int = 20) -> None:
    """Warn about the first ``shown`` skipped items (where, why); all of them are in the output's ``skipped``."""
    for where, reason in skipped[:shown]:
        log.warning("skipped %s: %s", where, reason)
    if len(skipped) > shown:
        log.warning("... and %d more, all listed in the 'skipped' array of %s", len(skipped) - shown, out)


# --------------------------------------------------------------------------- checkpoints and word vectors

def describe_checkpoint(path: Path, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a feature file records about the model that made it (stored as the JSON string ``config``)."""
    return {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path), "model": state["config"]["model"],
            **extra}


def count_oov(words: WordVectors, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-vocabulary tokens (M,) and tokens (M,) of every line, tokenised as ``words`` embeds them."""
    oov, tokens = np.zeros(len(lines), dtype=np.int64), np.zeros(len(lines), dtype=np.int64)
    for row, line in enumerate(lines):
        found = words.tokens(line)
        oov[row] = sum(words.index(token) is None for token in found)
        tokens[row] = len(found)
    return oov, tokens


# --------------------------------------------------------------------------- resumable image extraction

class PartStore:
    """The finished chunks of an extraction into ``OUT``: ``OUT.parts/manifest.json`` and ``part-NNNNNN.npz``.

    The manifest fingerprints what the results depend on (checkpoint bytes, image size, maps or not, the file
    list); a run only resumes parts whose manifest matches. Every file is written atomically.
    """

    CHECKED = {"checkpoint_sha256": "checkpoint", "size": "image size", "maps": "--maps setting",
               "files": "file list (number of files)", "files_sha256": "file list"}

    def __init__(self, out: Path) -> None:
        self.folder = Path(out).with_name(Path(out).name + ".parts")

    def start(self, manifest: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Open the store for a run; returns the manifest in force (a resumed run keeps its chunk size)."""
        path = self.folder / "manifest.json"
        if self.folder.exists() and not resume:
            raise ConfigError(f"{self.folder} holds an unfinished run; pass --resume to continue it, or delete it")
        if resume and path.exists():
            stored = json.loads(path.read_text(encoding="utf-8"))
            for key, what in self.CHECKED.items():
                if stored.get(key) != manifest[key]:
                    raise ConfigError(f"cannot resume {self.folder}: it was made with a different {what} "
                                      f"({stored.get(key)} vs {manifest[key]} now); delete it to start over")
            return stored
        if resume:
            log.info("nothing to resume in %s; starting", self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(path, manifest)
        return manifest

    def part(self, chunk: int) -> Path:
        return self.folder / f"part-{chunk:06d}.npz"

    def finished(self, chunks: int) -> list[int]:
        return [chunk for chunk in range(chunks) if self.part(chunk).exists()]

    def save(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        write_npz(self.part(chunk), arrays)

    def load(self, chunk: int, name: str) -> np.ndarray:
        return npz_array(self.part(chunk), name)

    def remove(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


@dataclass
class Extraction:
    """What an image extraction produced."""

    count: int  # images embedded
    skipped: list[tuple[str, str]]  # (path, reason)
    resumed_chunks: int  # chunks found finished and not recomputed
    timing: Timing


def run_manifest(checkpoint_sha256: str, size: int, maps: bool, entries: list[str],
                 chunk_size: int) -> dict[str, Any]:
    """What the parts of a run depend on (see :attr:`PartStore.CHECKED`), and their chunk size."""
    return {"version": PART_VERSION, "checkpoint_sha256": checkpoint_sha256, "size": size, "maps": maps,
            "files": len(entries), "files_sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest(),
            "chunk_size": chunk_size}


def chunk_batches(chunks: list[range], batch_size: int) -> list[list[int]]:
    """Batches of positions that never straddle two chunks, so every chunk can be flushed on its own."""
    return [list(chunk[i:i + batch_size]) for chunk in chunks for i in range(0, len(chunk), batch_size)]


def extract_images(encoder: ImageEncoder, folder: Path, entries: list[str], out: Path, size: int,
                   config_record: dict[str, Any], *, device: torch.device, amp: str | None = None,
                   batch_size: int = 32, workers: int = 2, chunk_size: int = 1000, maps: bool = False,
                   resume: bool = False, progress: bool = True) -> Extraction:
    """Embed every entry of ``entries`` (paths relative to ``folder``, or absolute) and write ``out``.

    ``out`` holds ``features`` (N, d) float32 unit rows, ``paths`` (N,), ``skipped`` (K, 2) (path, reason),
    ``config`` (JSON string: ``config_record``) and with ``maps`` the maps G (N, D', h, w) float16. Chunks of
    ``chunk_size`` entries are flushed to :class:`PartStore` as they finish; ``resume`` continues from them.
    """
    store = PartStore(out)
    manifest = run_manifest(config_record["checkpoint_sha256"], size, maps, entries, chunk_size)
    chunk_size = store.start(manifest, resume)["chunk_size"]
    chunks = [range(start, min(start + chunk_size, len(entries))) for start in range(0, len(entries), chunk_size)]
    done = set(store.finished(len(chunks)))
    if done:
        log.info("resuming: %d of %d chunks already done", len(done), len(chunks))
    batches = chunk_batches([chunk for number, chunk in enumerate(chunks) if number not in done], batch_size)
    loader = DataLoader(ImageFiles(folder, entries, size), batch_sampler=batches, num_workers=workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda")
    timing = Timing()
    pending: dict[str, list] = {"indices": [], "features": [], "maps": [], "failed": [], "reasons": []}
    seen = 0
    for batch, features, grids in embed_image_batches(encoder, loader, device, amp, maps, timing, progress):
        pending["indices"].append(batch.indices.numpy())
        pending["features"].append(features)
        if grids is not None:
            pending["maps"].append(grids)
        pending["failed"] += [index for index, _ in batch.failures]
        pending["reasons"] += [reason for _, reason in batch.failures]
        seen += len(batch.indices) + len(batch.failures)
        number = (int(batch.indices[0]) if len(batch.indices) else batch.failures[0][0]) // chunk_size
        if seen == len(chunks[number]):
            store.save(number, _chunk_arrays(pending, maps))
            pending = {key: [] for key in pending}
            seen = 0
    count, skipped = _assemble(store, entries, len(chunks), out, config_record, encoder.proj.out_features, maps)
    store.remove()
    return Extraction(count, skipped, len(done), timing)


def _chunk_arrays(pending: dict[str, list], maps: bool) -> dict[str, np.ndarray]:
    arrays = {"indices": np.concatenate(pending["indices"]).astype(np.int64),
              "features": np.concatenate(pending["features"]),
              "failed": np.array(pending["failed"], dtype=np.int64), "reasons": text_array(pending["reasons"])}
    if maps:
        arrays["maps"] = np.concatenate(pending["maps"]) if pending["maps"] else np.empty((0, 0, 0, 0), MAPS_DTYPE)
    return arrays


def _assemble(store: PartStore, entries: list[str], chunks: int, out: Path, config_record: dict[str, Any],
              embed_dim: int, maps: bool) -> tuple[int, list[tuple[str, str]]]:
    """Stream the parts into the final file; returns the number of images embedded and the skipped files."""
    indices = [store.load(chunk, "indices") for chunk in range(chunks)]
    filled = [chunk for chunk in range(chunks) if len(indices[chunk])]
    count = sum(len(i) for i in indices)
    skipped = [(entries[index], str(reason)) for chunk in range(chunks)
               for index, reason in zip(store.load(chunk, "failed"), store.load(chunk, "reasons"))]
    arrays: dict[str, np.ndarray | Streamed] = {
        "features": Streamed((count, embed_dim), np.float32,
                             lambda: (store.load(chunk, "features") for chunk in filled)),
        "paths": text_array([entries[index] for chunk in indices for index in chunk]),
        "skipped": skipped_array(skipped),
        "config": np.array(json.dumps(config_record)),
    }
    if maps:
        grid_shape = store.load(filled[0], "maps").shape[1:] if filled else (0, 0, 0)
        arrays["maps"] = Streamed((count, *grid_shape), MAPS_DTYPE,
                                  lambda: (store.load(chunk, "maps") for chunk in filled))
    write_npz(out, arrays)
    return count, skipped


# --------------------------------------------------------------------------- text lines

@dataclass
class TextLines:
    """The usable lines of a text file and the ones skipped."""

    lines: list[str]
    numbers: list[int]  # 1-based line number of each kept line
    skipped: list[tuple[int, str]]  # (line number, reason)


def read_text_lines(path: Path) -> TextLines:
    """Lines of a file, one caption each. Lines that are not valid UTF-8 or blank are skipped with a reason;
    a UTF-8 byte-order mark and Windows line ends are accepted."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"text file {path} not found")
    result = TextLines([], [], [])
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                result.skipped.append((number, f"invalid UTF-8 at byte {error.start}"))
                continue
            if not line.strip():
                result.skipped.append((number, "empty line"))
            else:
                result.lines.append(line)
                result.numbers.append(number)
    return result


def embed_lines(model: JointEmbedding, words: WordVectors, text: TextLines, device: torch.device,
                batch_size: int = 256, amp: str | None = None,
                progress: bool = True) -> tuple[TextLines, np.ndarray, np.ndarray, np.ndarray]:
    """Embed the lines of ``text`` (eq. 4): returns the lines kept, their unit embeddings (M, d) float32, their
    out-of-vocabulary token counts (M,) and token counts (M,).

    Lines that give no token as ``words`` tokenises them are skipped. So is a line whose words are all unknown to
    a vocabulary without an UNK vector: it embeds to zero (the SRU of a zero sequence stays zero), not to a unit
    vector.
    """
    oov, tokens = count_oov(words, text.lines)
    skipped = text.skipped + [(text.numbers[row], "no words") for row in np.flatnonzero(tokens == 0)]
    text = _keep(text, tokens > 0)
    oov, tokens = oov[tokens > 0], tokens[tokens > 0]
    features = (encode_captions(model, text.lines, words, device, batch_size, amp, progress).numpy() if text.lines
                else np.empty((0, model.config.embed_dim), dtype=np.float32))
    keep = np.linalg.norm(features, axis=1) > 0.5
    skipped += [(text.numbers[row], "no word in the vocabulary (zero embedding)") for row in np.flatnonzero(~keep)]
    text = _keep(text, keep)
    return TextLines(text.lines, text.numbers, sorted(skipped)), features[keep], oov[keep], tokens[keep]


def _keep(text: TextLines, mask: np.ndarray) -> TextLines:
    return TextLines([line for line, k in zip(text.lines, mask) if k],
                     [number for number, k in zip(text.numbers, mask) if k], text.skipped)


# --------------------------------------------------------------------------- search

@dataclass
class Collection:
    """A feature file to search: its rows memory-mapped, a label per row (image path or text line)."""

    path: Path
    features: np.ndarray  # (N, d) float32 unit rows, memory-mapped when stored uncompressed
    labels: np.ndarray  # (N,) str: image paths or text lines
    kind: str  # "image" or "text"
    config: dict[str, Any]
    line_numbers: np.ndarray | None  # (N,) for text collections


def load_collection(path: Path) -> Collection:
    """Open a feature file written by the image or text extraction."""
    path = Path(path)
    try:
        names = npz_names(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{path}: not a readable .npz feature file ({error})") from error
    if "features" not in names or not names & {"paths", "lines"}:
        raise ConfigError(f"{path}: expected 'features' and 'paths' (image features) or 'lines' (text features)")
    kind = "image" if "paths" in names else "text"
    features = npz_array(path, "features", mmap=True)
    if features.ndim != 2 or features.dtype != np.float32:
        raise ConfigError(f"{path}: 'features' must be (N, d) float32, got {features.shape} {features.dtype}")
    config = json.loads(str(npz_array(path, "config"))) if "config" in names else {}
    numbers = npz_array(path, "line_numbers") if kind == "text" else None
    return Collection(path, features, npz_array(path, "paths" if kind == "image" else "lines"), kind, config,
                      numbers)


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
    wanted = {"features": npz_fingerprint(collection.path), "count": len(collection.features),
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
    with atomic_path(index_path) as temporary:
        faiss.write_index(index, str(temporary))
    write_json(sidecar, wanted)
    log.info("built %s index of %d vectors in %.1f s: %s", type(index).__name__, index.ntotal,
             time.perf_counter() - started, index_path)
    return index, True


def index_search(index: Any, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of a faiss index; an IVF index visits ``nprobe`` lists (default :func:`default_nprobe`).
    Rows a query could not fill (too few vectors in the visited lists) have index -1."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, nprobe or default_nprobe(index.nlist))
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return scores, rows.astype(np.int64)
