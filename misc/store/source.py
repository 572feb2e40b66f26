"""A model source, what every command's ``-p`` takes: a checkpoint file or an export folder
(:mod:`misc.store.export`), and its provenance digest, the one results records and feature files keep.

Light to import (standard library only): ``eval_retrieval.py --features`` records provenance without torch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from misc.errors import UserError
from misc.store.files import sha256

# The files of an export folder: the weights and the configuration define its model; the word vectors, their
# vocabulary and the model card come with it.
WEIGHTS, CONFIG, WORDS, VOCAB, CARD = "model.safetensors", "config.json", "words.safetensors", "vocab.txt", "README.md"
DEFINING = (WEIGHTS, CONFIG)


def is_export(path: Path | str) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def model_sha256(path: Path | str) -> str:
    """The provenance digest of a model source: a checkpoint file's SHA-256; for an export folder the SHA-256 of
    the lines ``<sha256 of FILE>  FILE`` of :data:`DEFINING`, what ``sha256sum model.safetensors config.json |
    sha256sum`` prints inside the folder: a copied folder keeps its digest and another model never shares it."""
    path = Path(path)
    if path.is_file():
        return sha256(path)
    if not is_export(path) or not (path / WEIGHTS).is_file():
        raise UserError(f"{path}: neither a checkpoint file nor an export folder ({CONFIG} and {WEIGHTS}); pass "
                        f"-p with one")
    manifest = "".join(f"{sha256(path / name)}  {name}\n" for name in DEFINING)
    return hashlib.sha256(manifest.encode()).hexdigest()
