"""Checkpoints: one format, plain data only (loads with ``weights_only=True``), written atomically.

A checkpoint is a dict::

    {"format": "dsve-loc", "version": 1,
     "config": {"model": ModelConfig as dict, "train": TrainConfig as dict,
                "word_vectors": path (relative to the data root when under it), "words": {"file", "sha256"},
                "text": TextOptions as dict (optional; absent means this project's tokenisation)},
     "model": state_dict, "epoch": epochs completed, "best_rsum": float, "metrics": dict,
     "added_words": {"words": [...], "vectors": (N, dim)} (optional: the rows model.unknown_words=random drew),
     # training checkpoints also carry
     "optimizer": ..., "scheduler": ..., "scaler": ..., "best_epoch": the "epoch" of the best validation,
     "skipped_steps": non-finite steps skipped so far (train.skip_nonfinite),
     "data": one {"dataset", "split", "images", "pairs"} per training dataset (misc/data/mix.py),
     # and when written mid-epoch (--save-every, a stop signal): steps done in epoch "epoch", their running sums
     "step": int, "partial": dict, "rng": one {"torch", "cuda", "python"} per process}

Every value is plain data (dicts, lists, tuples, strings, numbers, tensors); a file holding another object is
refused.

The model config alone rebuilds the network (:func:`models.joint.build_model`, :func:`model_from`).

The original release's files are taken as they are (their conversion is :mod:`misc.store.original`'s): its joint model
``model.pth.tar`` is converted in memory by :func:`load`, so every CLI takes it, and its text preprocessing is
applied by :func:`load_words`; its ImageNet classification network initialises training (:func:`init_from`).
The top-level ``checkpoint.py`` is the command that converts (:func:`convert_file`) and inspects (:func:`describe`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import re
import zipfile
from dataclasses import asdict, fields
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from misc import config
from misc.store import export, original, source, word_refs
from misc.errors import UserError, few, first_line
from misc.store.files import atomic_path
from misc.data.words import TextOptions, WordVectors
from models.config import ModelConfig
from models.joint import Model, build_model

log = logging.getLogger(__name__)
FORMAT = "dsve-loc"
VERSION = 1
LAST, BEST = "last.pth.tar", "best.pth.tar"
PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def atomic_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through :func:`misc.store.files.atomic_path`: readers (and a power cut) find the previous file or
    the complete new one; a full disk is one line naming ``path``, the previous file intact."""
    with atomic_path(path) as temporary:
        buffer = io.BytesIO()
        torch.save(obj, buffer)  # in memory first: torch reports a failed file write without its errno
        temporary.write_bytes(buffer.getbuffer())


def save_training(state: dict[str, Any], folder: Path, is_best: bool) -> None:
    """Write a training checkpoint as ``folder/last.pth.tar`` and, if it is the best, first as ``best.pth.tar``: a
    kill between the two leaves a best newer than last (replayed identically on resume), never an older one."""
    if is_best:
        atomic_save(state, folder / BEST)
    atomic_save(state, folder / LAST)


def check_best(folder: Path, state: dict[str, Any]) -> None:
    """Check that ``folder/best.pth.tar`` is the best the resumed run ``state`` records (epoch, val rsum), in the
    log. A missing or stale one (an older version killed between its two writes) is rewritten from ``state`` when
    ``state`` is that best epoch's own checkpoint, else it is a warning."""
    best_epoch, path = state.get("best_epoch"), Path(folder) / BEST
    if best_epoch is None:
        return
    found = load(path) if path.is_file() else {}
    held, what = found.get("epoch"), f"the run's best (epoch {best_epoch}, val rsum {state['best_rsum']:.2f})"
    newer = isinstance(held, int) and held > best_epoch  # written before a kill: the replayed epochs rewrite it
    if newer or (held, found.get("best_rsum")) == (best_epoch, state["best_rsum"]):
        log.info("%s holds %s%s", path, what, " or a newer one" if newer else "")
    elif state["epoch"] == best_epoch and not state.get("step"):
        atomic_save(state, path)
        log.warning("%s was missing or stale (epoch %s): rewritten from the resumed checkpoint, %s", path, held, what)
    else:
        log.warning("%s %s, not %s, now lost; rewritten when validation beats it", path,
                    "is missing" if held is None else f"holds epoch {held}", what)


def read(path: Path | str) -> dict[str, Any]:
    """Load any checkpoint file as plain data, with a one-line error for files that are not one.

    Only :data:`misc.store.original.READABLE_GLOBALS` are allowed besides plain data, through
    ``torch.load(weights_only=True)``, for both torch file formats (the original release's torch 1.0 files are the
    legacy, non-zip one).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(original.READABLE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            KeyError) as error:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and unsupported:
            raise UserError(f"{path} holds Python objects ({unsupported[1]}), not plain data: it is not a "
                              f"checkpoint this code reads") from error
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file?): "
                          f"{first_line(error)}") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(data).__name__}, not a dict")
    return data


def load(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint of this project's format, an export folder (:mod:`misc.store.export`), or the original
    release's ``model.pth.tar`` converted to it."""
    return as_checkpoint(export.read_export(path) if source.is_export(path) else read(path), path)


def kind(data: dict[str, Any]) -> str:
    """``dsve-loc`` (this project), else :func:`misc.store.original.kind`: ``original``, ``classification`` or
    ``unknown``."""
    return FORMAT if data.get("format") == FORMAT else original.kind(data)


def as_checkpoint(data: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """The checkpoint in ``data`` (read from ``path``) in this project's format; one-line errors otherwise."""
    found = kind(data)
    if found == "original":
        return {"format": FORMAT, "version": VERSION, **original.convert_original(data, path)}
    if found == "classification":
        raise UserError(f"{path} is the original release's ImageNet classification network, not a joint model; "
                          f"it initialises training: train.py --init {path}")
    if found != FORMAT:
        raise UserError(f"{path} is neither a DSVE-Loc checkpoint (no 'format': '{FORMAT}' key) nor an original "
                          f"dsve-loc model.pth.tar; its keys: {few(data)}")
    if not isinstance(data.get("version", 0), int) or data.get("version", 0) > VERSION:
        raise UserError(f"{path} has format version {data['version']!r}; this code reads up to {VERSION}")
    check_plain(data, path)
    saved, weights = data.get("config"), data.get("model")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(key, {}), dict) for key in ("model", "train")) \
            or "model" not in saved:
        raise UserError(f"{path} holds no model configuration (config.model, a dict), so its network cannot be "
                        f"rebuilt: it is not a checkpoint of this project's train.py or checkpoint.py convert")
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise UserError(f"{path}: 'model' is not a state dict of tensors")
    with naming(path):
        config.from_dict(ModelConfig, saved["model"])
    return data


def check_plain(value: Any, path: Path | str, where: str = "") -> None:
    """Refuse, in one line, any value inside a checkpoint that is not plain data (:data:`PLAIN`, dicts, lists,
    tuples): ``weights_only`` loading admits a few classes for the original release's files, not for ours."""
    if isinstance(value, (dict, list, tuple)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            check_plain(key, path, where)
            check_plain(item, path, f"{where}.{key}" if where else str(key))
    elif not isinstance(value, PLAIN):
        raise UserError(f"{path} holds a Python object ({type(value).__module__}.{type(value).__qualname__} at "
                        f"{where or 'the top'}), not plain data: it is not a checkpoint this code reads")


@contextlib.contextmanager
def naming(source: Path | str) -> Iterator[None]:
    """Prefix the one-line errors raised inside with ``source``: a bad value or name in a checkpoint's config."""
    try:
        yield
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def model_from(state: dict[str, Any], source: Path | str, device: torch.device | str = "cpu") -> Model:
    """Rebuild the network of a loaded checkpoint (read from ``source``), either system's, load its weights, move
    it to ``device`` in eval mode.

    The network is built on the meta device, given uninitialised memory on ``device`` and filled from the
    checkpoint: no random initialisation to overwrite. The weights are copied into that fresh memory rather than
    adopted (``assign``), so their alignment, and with it every float32 result, is the same whichever file they came
    from (an export's safetensors or a checkpoint)."""
    with naming(source), torch.device("meta"):
        model = build_model(state["config"]["model"])
    model = model.to_empty(device=device)
    load_weights(model, state["model"], source)
    return model.eval()


def load_words(state: dict[str, Any], override_path: Path | str | None = None,
               checkpoint_path: Path | str | None = None) -> WordVectors:
    """The word vectors of a loaded checkpoint, with its text preprocessing, checked against its text path.

    The file is ``override_path`` (a CLI's ``--words``), else the one the checkpoint names
    (:func:`misc.store.word_refs.find_words`: found by name under the data root, checked by sha256), else config key
    ``word_vectors`` (the demo world's when the checkpoint trained on it); converted original models name none,
    so they use the configured skip-thought table. ``checkpoint_path`` only names the checkpoint in errors.
    """
    saved = state["config"]
    path = (word_refs.find_words(saved, override_path, checkpoint_path or "checkpoint")
            or config.path("word_vectors", demo=saved["train"].get("dataset") == "demo"))
    text = saved.get("text") or {}
    known = {f.name for f in fields(TextOptions)}
    if set(text) - known:
        raise UserError(f"{checkpoint_path or 'checkpoint'}: unknown text options {sorted(set(text) - known)}; "
                          f"known: {sorted(known)}")
    words = export.read_word_vectors(Path(path), TextOptions(**text))
    words.units = saved["model"].get("text_units", "words")
    added = state.get("added_words")
    if added and not set(added["words"]) <= set(words.vectors.key_to_index):  # an export's table holds them
        words.add(added["words"], added["vectors"].numpy())
    expected = saved["model"]["word_dim"]
    if words.dim != expected:
        raise UserError(f"word vectors {words.source} are {words.dim}-d but {checkpoint_path or 'the checkpoint'} "
                          f"expects {expected}-d (model.word_dim); pass --words with the vectors it was trained with")
    return words


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside any wrapper (DDP, compile)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def check_state(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: Path | str) -> None:
    """One line naming a few missing, unexpected and mis-shaped keys when ``given`` does not fit ``expected``."""
    missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
    shapes = [f"{key} {tuple(given[key].shape)} instead of {tuple(expected[key].shape)}"
              for key in sorted(expected.keys() & given.keys()) if given[key].shape != expected[key].shape]
    problems = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + \
               ([f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else []) + \
               ([f"{len(shapes)} of another shape ({few(shapes, 2)})"] if shapes else [])
    if problems:
        raise UserError(f"{source}: weights do not fit the model: {'; '.join(problems)}")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load every weight of ``model`` from ``state``, strictly, with :func:`check_state`'s one-line errors."""
    model = unwrap(model)
    check_state(model.state_dict(), state, source)
    model.load_state_dict(state)


def init_from(model: nn.Module, path: Path | str) -> str:
    """Initialise ``model`` for training (``train.py --init``) and say what was loaded.

    - the original release's classification network (``pretrained_classif_152_2400.pth.tar``): the trunk and the
      1x1 conv, strictly; its 1000-class classifier is not used (paper §4.1, image pipeline);
    - an original ``model.pth.tar`` or a checkpoint of this project: every weight, strictly.
    """
    data = read(path)
    if kind(data) == "classification":
        given = original.classification_state(data, path)
        bare = unwrap(model)
        expected = {key: value for key, value in bare.state_dict().items()
                    if key.startswith(("image.trunk.", "image.adapt."))}
        check_state(expected, given, path)
        bare.load_state_dict(given, strict=False)  # exactly the trunk and the 1x1 conv, checked above
        return (f"initialised the trunk ({original.infer_trunk(given, path)}) and the 1x1 conv ({len(given)} "
                f"tensors) from {path}; its ImageNet classifier is not used")
    state = as_checkpoint(data, path)
    load_weights(model, state["model"], path)
    origin = "the original release's model" if "origin" in state else "checkpoint"
    return f"initialised every weight ({len(state['model'])} tensors) from {origin} {path}"


def convert_file(source: Path, out: Path) -> str:
    """Convert an original ``model.pth.tar`` to this project's format at ``out`` (checked to load first)."""
    data = read(source)
    if kind(data) != "original":
        raise UserError(f"{source}: not an original dsve-loc model.pth.tar (kind: {kind(data)}); convert reads "
                          f"the original release's joint model only")
    converted = as_checkpoint(data, source)
    model_from(converted, source)
    atomic_save(converted, out)
    return f"{source} -> {out}: {summary(converted['config']['model'])}"


def export_file(path: Path | str, out: Path | str, words: Path | str | None = None,
                words_ref: bool = False) -> list[Path]:
    """Export the checkpoint at ``path`` as the folder ``out`` (:func:`misc.store.export.write_export`) with its word
    vectors (``words`` overrides the stored file), or only their name and sha256 (``words_ref``), and the numbers
    of the run's ``results.json`` beside it in its model card."""
    state = load(path)
    if words_ref and state.get("added_words"):
        raise UserError(f"{path}: its {len(state['added_words']['words'])} drawn word vectors "
                        f"(model.unknown_words=random) are in no word file: export it without --words-ref")
    vectors = None if words_ref else load_words(state, words, path)
    found = vectors.source if vectors is not None else word_refs.find_words(state["config"], words, path)
    if found is not None and Path(found).is_file():
        stored, reference = word_refs.reference(Path(found))
        state = {**state, "config": {**state["config"], "word_vectors": stored, "words": reference}}
    results = Path(path).parent / "results.json"
    numbers = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else None
    return export.write_export(state, Path(path), Path(out), vectors, numbers)


def summary(model: dict[str, Any]) -> str:
    """``key=value`` pairs of a config dict on one line."""
    return " ".join(f"{key}={value}" for key, value in model.items())


def describe(path: Path) -> str:
    """A few lines on what a checkpoint file holds."""
    data = export.read_export(path) if source.is_export(path) else read(path)
    found = kind(data)
    if found == "classification":
        return original.describe_classification(data, path)
    state = as_checkpoint(data, path)
    saved = state["config"]
    tensors = state["model"].values()
    origin = state.get("origin", {}).get("file")
    digest = (saved.get("words") or {}).get("sha256")
    what = ("original dsve-loc model (converted on loading)" if found == "original" else
            f"DSVE-Loc checkpoint{f' converted from the original release {origin}' if origin else ''}")
    lines = [f"{path}: {what}",
             f"model: {summary(saved['model'])}",
             f"text: {summary(saved.get('text') or asdict(TextOptions()))}",
             f"word vectors: {saved.get('word_vectors') or 'none named (config key word_vectors)'}"
             f"{f' (sha256 {digest})' if digest else ''}",
             f"epoch: {state.get('epoch')}; {len(state['model'])} tensors, "
             f"{sum(t.numel() for t in tensors if t.is_floating_point()) / 1e6:.1f} M values"]
    return "\n".join(lines)

