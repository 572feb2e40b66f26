"""Portable models: word-vector references that survive a copy to another machine, and export folders.

A checkpoint names its word vectors by ``config["word_vectors"]`` (a path relative to the data root
:data:`misc.config.DATA` when the file lies under it, the name of an installed word-vector package, else the
absolute path) and ``config["words"]`` (``{"file": name, "sha256": digest}``). :func:`find_words` looks the file
up where it was, under the data root and at the configured word-vector keys, and checks its digest; a missing or
different file is one line naming ``--words``. Checkpoints written before ``config["words"]`` existed name a path
relative to the project (or an absolute one) and are read as they are.

An export folder (:func:`write_export`, ``python export.py``, ``train.py --export``) holds what inference needs and
nothing of the training state::

    model.safetensors   the weights
    config.json         {"format", "version", "export", "config": model, train, text, words, "epoch", "metrics"}
    words.safetensors   the word vectors the model was trained with ("vectors", (V, word_dim) float32) and
    vocab.txt           their words, one a line, row i on line i + 1 (or, with words_ref, only their reference)
    README.md           the model card

It is written as a temporary folder, then renamed; :func:`read_export` turns it back into a checkpoint dict, so
:func:`misc.store.checkpoint.load` and everything built on it (``Inference.load``, every CLI) take the folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from gensim.models import KeyedVectors
from safetensors.torch import load_file, save_file

from misc import config
from misc.errors import UserError
from misc.store.files import atomic_path, file_sha256, writing
from misc.train.schedule import describe
from misc.data.words import PACKAGED, TextOptions, WordVectors, load_word_vectors, packaged

log = logging.getLogger(__name__)
EXPORT = 1  # version of the export folder's layout
WEIGHTS, CONFIG, WORDS, VOCAB, CARD = "model.safetensors", "config.json", "words.safetensors", "vocab.txt", "README.md"


# --------------------------------------------------------------------------- word-vector references

@cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """:func:`misc.store.files.file_sha256`, cached per file version (path, size, modification time)."""
    return file_sha256(path)


def sha256(path: Path) -> str:
    """The SHA-256 of a file, computed once per file version in a process."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def reference(source: Path) -> tuple[str, dict[str, str]]:
    """How a checkpoint names the word-vector file ``source``: (``config["word_vectors"]``, ``config["words"]``)."""
    resolved = Path(source).resolve()
    stored = str(resolved)
    for name in PACKAGED:
        with contextlib.suppress(UserError):  # a package that is not installed holds nothing
            if resolved.is_relative_to(packaged(name).resolve()):
                stored = name
    if resolved.is_relative_to(config.DATA.resolve()):
        stored = str(resolved.relative_to(config.DATA.resolve()))
    return stored, {"file": resolved.name, "sha256": sha256(resolved)}


def candidates(stored: str, name: str, legacy: bool) -> list[Path]:
    """Where a file the checkpoint names may be, in order: where it was, under the data root, at the configured
    word-vector keys (the demo world's included) when their file has its name."""
    path = Path(stored)
    found = [path if path.is_absolute() else (config.ROOT if legacy else config.DATA) / path]
    if stored in PACKAGED:
        with contextlib.suppress(UserError):
            found.insert(0, packaged(stored) / name)
    found += [config.DATA / "words" / name, config.DATA / name]
    configured = [config.path(key, must_exist=False) for key in ("word_vectors", "glove_vectors")]
    found += [path for path in (*configured, config.DEMO_PATHS["word_vectors"]) if path.name == name]
    return list(dict.fromkeys(found))


def find_words(saved: dict[str, Any], override: Path | str | None, source: Path | str) -> Path | None:
    """The word-vector file of the checkpoint config ``saved`` (read from ``source``): ``override`` (``--words``;
    a different digest is a warning: the same vectors re-saved in another format differ by their bytes, and a
    wrong width still fails in :func:`misc.store.checkpoint.load_words`), else the file it names, found by
    :func:`candidates` and checked by digest; None when it names none (converted original models)."""
    stored, ref = saved.get("word_vectors"), saved.get("words") or {}
    if override is not None:
        if ref.get("sha256") and Path(override).is_file() and sha256(Path(override)) != ref["sha256"]:
            log.warning("--words %s is not the file %s was trained with (%s, sha256 %s): its embeddings are only "
                        "right if these are the same vectors", override, source, ref["file"], ref["sha256"][:12])
        return Path(override)
    if stored is None:
        return None
    name = ref.get("file") or Path(stored).name
    digest = ref.get("sha256")
    where = candidates(stored, name, legacy=not ref)
    present = [path for path in where if path.is_file() or path.is_dir()]
    for path in present:
        if digest is None or path.is_dir() or sha256(path) == digest:
            return path
    about = f"checkpoint {source} needs word vectors {name!r} ({f'sha256 {digest[:12]}; ' if digest else ''}" \
            f"key config.word_vectors = {stored!r})"
    if present:
        raise UserError(f"{about}: {present[0]} has another sha256 ({sha256(present[0])[:12]}); put the right "
                        f"file under {config.DATA} or pass --words PATH to use this one anyway")
    raise UserError(f"{about}: not found under {config.DATA} (the data root) nor at config key word_vectors; "
                    f"pass --words PATH")


def read_word_vectors(path: Path, options: TextOptions) -> WordVectors:
    """:func:`misc.data.words.load_word_vectors`, and an export folder's ``words.safetensors`` with its
    ``vocab.txt``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_word_vectors(path, options)
    matrix = load_file(path)["vectors"].numpy()
    vocab = path.with_name(VOCAB).read_text(encoding="utf-8").split("\n")[:-1]
    if len(vocab) != len(matrix):
        raise UserError(f"{path.with_name(VOCAB)}: {len(vocab)} words but {path} has {len(matrix)} rows")
    vectors = KeyedVectors(vector_size=matrix.shape[1], count=len(vocab))
    vectors.add_vectors(vocab, matrix)
    return WordVectors(vectors, path, options)


# --------------------------------------------------------------------------- export folders

def write_export(state: dict[str, Any], source: Path, out: Path, words: WordVectors | None,
                 results: dict[str, Any] | None = None) -> list[Path]:
    """Write the checkpoint ``state`` (read from ``source``) as an export folder ``out`` (replacing an earlier
    export there): its weights, its configuration, the word vectors ``words`` (None: only their reference) and a
    model card with ``results`` (a run's results.json). Returns the files written."""
    out = Path(out)
    if out.exists() and not (out / CONFIG).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an export folder: choose another -o DIR")
    saved = dict(state["config"])
    if words is not None:
        saved["word_vectors"], saved["words"] = WORDS, {"file": WORDS, "vocab": VOCAB,
                                                        "trained_with": saved.get("words")}
    meta = {"format": state["format"], "version": state["version"], "export": EXPORT, "source": source.name,
            "config": saved, "epoch": state.get("epoch"), "best_rsum": state.get("best_rsum"),
            "metrics": {"val": (state.get("metrics") or {}).get("val")}}
    aside = out.with_name(f".{out.name}.replaced")
    with atomic_path(out) as temporary:
        temporary.mkdir()
        save_file({key: value.contiguous() for key, value in state["model"].items()}, temporary / WEIGHTS)
        (temporary / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if words is not None:
            _write_words(words, temporary)
        (temporary / CARD).write_text(card(meta, results), encoding="utf-8")
        for path in temporary.iterdir():
            _sync(path)
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(out, aside)  # the old export steps aside only once the new one is complete
    shutil.rmtree(aside, ignore_errors=True)
    return sorted(out.iterdir())


def _write_words(words: WordVectors, folder: Path) -> None:
    keys = [str(key) for key in words.vectors.index_to_key]
    if any("\n" in key for key in keys):
        raise UserError(f"word vectors {words.source}: a word holds a line break, which vocab.txt cannot store; "
                        f"export with --words-ref")
    save_file({"vectors": torch.from_numpy(words.vectors.vectors.astype("float32"))}, folder / WORDS)
    (folder / VOCAB).write_text("".join(f"{key}\n" for key in keys), encoding="utf-8")


def _sync(path: Path) -> None:
    with writing(path):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def is_export(path: Path | str) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_export(folder: Path | str) -> dict[str, Any]:
    """An export folder as a checkpoint dict (no training state); embedded word vectors are named by their path
    inside the folder."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        weights = load_file(folder / WEIGHTS)
    except (OSError, ValueError) as error:
        raise UserError(f"{folder} is not a readable export folder ({CONFIG} and {WEIGHTS}): {error}") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or meta.get("export", 0) > EXPORT:
        raise UserError(f"{folder / CONFIG} is not an export's configuration this code reads (export <= {EXPORT})")
    saved = meta["config"]
    if saved.get("word_vectors") == WORDS:
        saved["word_vectors"], saved["words"] = str((folder / WORDS).resolve()), None
    return {key: value for key, value in meta.items() if key not in ("export", "source")} | {"model": weights}


# --------------------------------------------------------------------------- the model card

SYSTEMS = {"dsve": "DSVE-Loc (Engilberge, Chevallier, Perez, Cord, CVPR 2018): ResNet + WELDON pooling (eq. 1-3) "
                   "and an SRU over frozen word vectors (eq. 4), trained with a triplet loss (eq. 5-7)",
           "matchmap": "the matchmap system of Das, Ghouse, Verma, Li (2019): a grid of region vectors and an LSTM "
                       "over frozen word vectors, trained with the N-pair loss"}
DATASETS = {"coco": "MS-COCO 2014 images with their captions, Karpathy's splits",
        "flickr30k": "Flickr30k images with their captions, Karpathy's splits",
        "demo": "the built-in synthetic demo world (misc/data/demo.py): coloured shapes on textures, "
                "templated captions"}


def card(meta: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The model card (README.md) of an export: the model, its data, its schedule, its numbers, its use and
    limits."""
    saved, model, train = meta["config"], meta["config"]["model"], meta["config"]["train"]
    words = saved.get("words") or {}
    trained_with = words.get("trained_with") or words
    embedded = saved.get("word_vectors") == WORDS
    dataset = f"`{train['dataset']}` (a JSON-lines file, data/README.md)"
    lines = [f"# {model['arch']} model, {model['trunk']} trunk",
             "", f"Exported from `{meta['source']}` after epoch {meta.get('epoch')}.", "",
             "## Model", "", f"- system: {SYSTEMS[model['arch']]}",
             f"- configuration (models/config.py): {', '.join(f'{k}={v}' for k, v in model.items())}",
             f"- trunk start: {model.get('trunk_init') or 'not recorded'}",
             f"- word vectors: `{trained_with.get('file', saved.get('word_vectors'))}` (sha256 "
             f"{trained_with.get('sha256', 'not recorded')}), "
             + (f"embedded here ({WORDS}, {VOCAB})" if embedded else "referenced only: pass `--words PATH`"),
             "", "## Training data", "",
             f"- {DATASETS.get(train['dataset'], dataset)}",
             f"- trained on split `{train['split']}`, validated on `{train['val_split']}`; crops of "
             f"{train['crop_size']} px, evaluated at {train['test_size']} px",
             "", "## Schedule", "", "```", describe(config.from_dict(config.TrainConfig, train), model["arch"]),
             f"batch size {train['batch_size']}, margin {train['margin']}, seed {train['seed']}", "```",
             "", "## Results", "", *_numbers(meta, results),
             "", "## Intended use", "",
             "Cross-modal retrieval (images by text, text by image) and text localization heatmaps on images like "
             "the training data, for research. Load it with `Inference.load(FOLDER)` (misc/inference.py) or pass "
             "the folder to any command's `-p`.",
             "", "## Limitations", "",
             "- It knows the words of its vocabulary only: others map to the unknown vector.",
             "- Its numbers hold on its own test data; other images and other phrasings score lower, and it "
             "carries the biases of its captions.",
             "- Heatmaps are coarse (the trunk's grid) and show where the model looks, not object outlines.",
             *(["- Trained on synthetic shapes: it knows nothing of real photographs."]
               if train["dataset"] == "demo" else []), ""]
    return "\n".join(lines)


def _numbers(meta: dict[str, Any], results: dict[str, Any] | None) -> list[str]:
    """Markdown table rows of the validation metrics the checkpoint holds and every number of ``results``."""
    found = {f"validation at export ({key})": value for key, value in ((meta.get("metrics") or {}).get("val")
                                                                      or {}).items()}
    found.update(results or {})
    rows = [f"| {name} | {value:.4g} |" for name, value in _leaves(found)]
    if not rows:
        return ["No results were recorded for this model."]
    return ["| metric | value |", "|---|---|", *rows]


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _leaves(value, f"{name} / ")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, value))
    return out
