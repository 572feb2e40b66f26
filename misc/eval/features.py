"""Precomputed features to evaluate retrieval on (numpy only, so that ``eval_retrieval.py --features`` loads no
model, image or word library): an .npz of images, captions[, owner], or the outputs of the two extraction commands
paired by image path."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from misc.errors import UserError
from misc.eval.retrieval import caption_owner_default
from misc.store.arrays import TextColumn, npz_array, npz_names


@dataclass
class Embedded:
    """Embeddings to evaluate and where they come from (the provenance fields of the results record)."""

    images: np.ndarray  # (N, d) float32
    captions: np.ndarray  # (M, d) float32
    owner: np.ndarray  # (M,) image row of each caption
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, checkpoint_sha256, dataset, split, size, ...


def load_features(path: Path) -> Embedded:
    """images (N, d), captions (M, d) float32 and the owner image of each caption, from a --save-features .npz."""
    try:
        with np.load(path) as data:
            images, captions = data["images"], data["captions"]
            owner = data.get("owner")
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable .npz file ({error})") from error
    except KeyError as error:
        raise UserError(f"{path}: needs arrays 'images' (N, d) and 'captions' (5N, d), or is IMAGES.npz of "
                        f"image_features_extraction.py (then add --text-features CAPTIONS.npz); missing {error}"
                        ) from error
    if images.ndim != 2 or captions.ndim != 2 or images.shape[1] != captions.shape[1]:
        raise UserError(f"{path}: 'images' {images.shape} and 'captions' {captions.shape} must be (N, d), (M, d)")
    if owner is None:
        try:
            owner = caption_owner_default(len(images), len(captions))
        except ValueError as error:
            raise UserError(f"{path}: {error}; or store an 'owner' array (image index of each caption)") from error
    return Embedded(images.astype(np.float32, copy=False), captions.astype(np.float32, copy=False), owner,
                    {"dataset": str(path)})


def _extracted(path: Path, labels: str, command: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Features, the label of each row (``labels``: an array or a text column) and the config of an extraction
    (an extraction may be a folder in the sharded layout: image rows are labelled by their ``source``, text rows
    by their ``key``, the image a --tsv line or a .jsonl row names)."""
    if Path(path).is_dir():
        from misc.collections.shards import load_sharded, stored_column

        collection = load_sharded(path)
        rows = collection.labels.tolist() if collection.kind == "image" else stored_column(path, "key")
        return np.asarray(collection.features), rows, collection.config
    try:
        names = npz_names(path)
        if "features" not in names or labels not in names | {name.removesuffix("_utf8") for name in names}:
            raise UserError(f"{path}: expected 'features' and '{labels}', as {command} writes them")
        features = npz_array(path, "features")
        rows = TextColumn(path, labels).tolist() if f"{labels}_utf8" in names else npz_array(path, labels).tolist()
        config = json.loads(str(npz_array(path, "config"))) if "config" in names else {}
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}: not a readable feature file of {command} ({error})") from error
    if features.ndim != 2 or len(rows) != len(features):
        raise UserError(f"{path}: {features.shape} features for {len(rows)} {labels}")
    return features.astype(np.float32, copy=False), rows, config


def _examples(values: list[str], shown: int = 3) -> str:
    return ", ".join(repr(value) for value in values[:shown]) + (", ..." if len(values) > shown else "")


def paired_features(images_path: Path, captions_path: Path) -> Embedded:
    """Image features and caption features paired by image path: caption j belongs to the stored image its line
    names (IMAGE<TAB>CAPTION, kept by text_features_extraction.py --tsv as the column ``image_paths``)."""
    images, paths, image_config = _extracted(images_path, "paths", "image_features_extraction.py")
    captions, named, text_config = _extracted(captions_path, "image_paths", "text_features_extraction.py --tsv")
    if images.shape[1] != captions.shape[1]:
        raise UserError(f"{images_path} holds {images.shape[1]}-d and {captions_path} {captions.shape[1]}-d "
                        f"features: they come from different models")
    made_by = {image_config.get("checkpoint_sha256"), text_config.get("checkpoint_sha256")}
    if None not in made_by and len(made_by) > 1:
        raise UserError(f"{images_path} and {captions_path} were made by different checkpoints "
                        f"({image_config.get('checkpoint')}, {text_config.get('checkpoint')}): extract both with one")
    row = {path: index for index, path in enumerate(paths)}
    unknown = sorted({name for name in named if name not in row})
    if unknown:
        raise UserError(f"{captions_path}: {sum(name not in row for name in named)} captions name {len(unknown)} "
                        f"images not in {images_path} ({_examples(unknown)}); IMAGE must be a stored path, e.g. "
                        f"{paths[0]!r}" if paths else f"{images_path} holds no image")
    owner = np.array([row[name] for name in named], dtype=np.int64)
    lonely = [paths[index] for index in np.setdiff1d(np.arange(len(paths)), owner)]
    if lonely:
        raise UserError(f"{len(lonely)} of the {len(paths)} images of {images_path} have no caption in "
                        f"{captions_path} ({_examples(lonely)}); extract the images of the captions only (--list)")
    source = {"checkpoint": image_config.get("checkpoint"), "checkpoint_sha256": image_config.get("checkpoint_sha256"),
              "dataset": f"{images_path} + {captions_path}", "size": image_config.get("size"), "protocol": "resize"}
    return Embedded(images, captions, owner, source)
