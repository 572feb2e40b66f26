"""Array files: plain uncompressed ``.npz`` written atomically (optionally streamed block by block), arrays
memory-mapped out of them, and fingerprints of them."""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable

import numpy as np

from misc.errors import UserError
from misc.store.files import atomic_path


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
    """One array of an .npz; with ``mmap`` an uncompressed one is memory-mapped (read-only) instead of read.

    A member holding Python objects (pickled data, which could run code when loaded) is refused with a one-line
    :class:`UserError` naming the file and the member; every reader of feature files comes through here.
    """
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if not mmap or info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                _refuse_objects(path, name, _read_header(member)[2])
                member.seek(0)
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the member's local header: name and extra-field lengths at bytes 26-29
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        shape, fortran, dtype = _read_header(handle)
        offset = handle.tell()
    _refuse_objects(path, name, dtype)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def _read_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the .npy at ``handle``'s position, which is left at the data."""
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(handle)


def _refuse_objects(path: Path, name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise UserError(f"{path}: array '{name}' holds Python objects (pickled data, which could run code when "
                        f"loaded): refused; feature files hold numbers and text only, make it again with the "
                        f"extraction commands")


def npz_names(path: Path) -> set[str]:
    """Names of the arrays an .npz holds."""
    with zipfile.ZipFile(path) as archive:
        return {name[:-4] for name in archive.namelist() if name.endswith(".npy")}


def npz_fingerprint(path: Path) -> str:
    """A content fingerprint of an .npz that reads only its directory: every member's name, size and CRC-32."""
    with zipfile.ZipFile(path) as archive:
        entries = sorted((i.filename, i.file_size, i.CRC) for i in archive.infolist())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def text_array(values: list[str]) -> np.ndarray:
    """Strings as a fixed-width unicode array (loads without pickle); an empty list keeps a width of 1.

    numpy pads such strings with NUL and drops trailing NULs when reading them back (leading ones stay): a value
    ending in NUL is a ValueError here, since it would not round-trip; store such text with :func:`text_column`.
    """
    _check_fixed_width(values)
    return np.array(values, dtype=str) if values else np.empty(0, dtype="<U1")


def skipped_array(skipped: list[tuple[str, str]]) -> np.ndarray:
    """(K, 2) strings: where (a path or a line number) and why."""
    _check_fixed_width([text for entry in skipped for text in entry])
    return np.array(skipped, dtype=str).reshape(-1, 2) if skipped else np.empty((0, 2), dtype="<U1")


def _check_fixed_width(values: Iterable[str]) -> None:
    for value in values:
        if value.endswith("\x00"):
            raise ValueError(f"{value!r} ends in NUL, which a fixed-width string array drops; use text_column")


def text_column(values: list[str], name: str) -> dict[str, np.ndarray]:
    """Strings stored verbatim at their own length: ``NAME_utf8`` (all of them, UTF-8, one uint8 array) and
    ``NAME_offsets`` (N + 1,) int64, string i being bytes offsets[i]:offsets[i + 1]. Unlike a fixed-width
    unicode array, this keeps trailing NUL characters and costs no padding to the longest string."""
    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in encoded], out=offsets[1:])
    return {f"{name}_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8), f"{name}_offsets": offsets}


class TextColumn:
    """The strings of :func:`text_column` in an .npz, read one at a time from the memory-mapped bytes."""

    def __init__(self, path: Path, name: str) -> None:
        self.data = npz_array(path, f"{name}_utf8", mmap=True)
        self.offsets = npz_array(path, f"{name}_offsets")
        offsets = self.offsets
        if (self.data.ndim != 1 or offsets.ndim != 1 or not len(offsets) or offsets[0] != 0
                or offsets[-1] != len(self.data) or (np.diff(offsets) < 0).any()):
            raise ValueError(f"{path}: {name}_offsets do not cut {name}_utf8 into strings")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        return bytes(self.data[self.offsets[row]:self.offsets[row + 1]]).decode("utf-8")

    def tolist(self) -> list[str]:
        return [self[row] for row in range(len(self))]
