"""Checkpoints: one format, plain data only (loads with ``weights_only=True``), written atomically.

A checkpoint is a dict::

    {"format": "dsve-loc", "version": 1,
     "config": {"model": ModelConfig as dict, "train": TrainConfig as dict, "word_vectors": path},
     "model": state_dict, "epoch": epochs completed, "best_rsum": float, "metrics": dict,
     # training checkpoints also carry
     "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": {"torch", "cuda", "python"}}

The model config alone rebuilds the network (:func:`models.joint.build_model`).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from misc.config import ROOT, ConfigError
from models.joint import JointEmbedding, build_model

FORMAT = "dsve-loc"
VERSION = 1


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def portable_path(path: Path | str | None) -> str | None:
    """Store paths inside the project relative to it, so a checkpoint keeps working in another clone."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def resolve_path(stored: str | None) -> Path | None:
    if stored is None:
        return None
    candidate = Path(stored)
    return candidate if candidate.is_absolute() else ROOT / candidate


def read(path: Path | str) -> dict[str, Any]:
    """Load any checkpoint file as plain data, with a one-line error for files that are not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} is not a readable checkpoint (truncated or not a torch file?): {reason}") \
            from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a checkpoint: it holds a {type(data).__name__}, not a dict")
    return data


def load(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint of this project's format."""
    data = read(path)
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a DSVE-Loc checkpoint (no 'format': '{FORMAT}' key)")
    if data.get("version", 0) > VERSION:
        raise ConfigError(f"{path} has format version {data['version']}; this code reads up to {VERSION}")
    return data


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[JointEmbedding, dict[str, Any]]:
    """Rebuild the network of a checkpoint, load its weights, move it to ``device`` in eval mode."""
    data = load(path)
    model = build_model(data["config"]["model"])
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as error:
        raise ConfigError(f"{path}: weights do not match its own config: {str(error).splitlines()[0]}") from error
    return model.to(device).eval(), data


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the bare model, whatever wrapper (DDP, compile) is around it."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.state_dict()
