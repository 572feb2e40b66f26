"""Export folders: a model for inference, without its training state, that survives a copy to another machine.

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

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from gensim.models import KeyedVectors
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from misc import config
from misc.errors import UserError, first_line
from misc.data.words import TextOptions, WordVectors, load_word_vectors
from misc.store.files import atomic_path, writing
from misc.store.source import CARD, CONFIG, VOCAB, WEIGHTS, WORDS
from misc.train.schedule import describe
from models.checks import from_dict
from models.config import ModelConfig
from models.joint import system_class

EXPORT = 1  # version of the export folder's layout


# --------------------------------------------------------------------------- export folders

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
    vectors = KeyedVectors(vector_size=matrix.shape[1])
    vectors.add_vectors(vocab, matrix)
    return WordVectors(vectors, path, options)


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
        mode = (temporary / CONFIG).stat().st_mode & 0o777  # what the umask gives a new file
        for path in temporary.iterdir():
            os.chmod(path, mode)  # safetensors writes its files readable by their owner only
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


def read_export(folder: Path | str) -> dict[str, Any]:
    """An export folder as a checkpoint dict (no training state); embedded word vectors are named by their path
    inside the folder. An export is input like any file: each file is checked before anything large is allocated
    (:func:`check_export`), so a damaged or mismatched one is one line naming the file."""
    folder = Path(folder)
    meta = read_config(folder / CONFIG)
    check_export(folder, meta["config"])
    weights = load_file(folder / WEIGHTS)
    saved = meta["config"]
    if saved.get("word_vectors") == WORDS:
        saved["word_vectors"], saved["words"] = str((folder / WORDS).resolve()), None
    return {key: value for key, value in meta.items() if key not in ("export", "source")} | {"model": weights}


def read_config(path: Path) -> dict[str, Any]:
    """An export's ``config.json``, checked to be one this code reads."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not a readable export configuration ({first_line(error)}); export the model "
                        f"again with export.py") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or meta.get("export", 0) > EXPORT:
        raise UserError(f"{path} is not an export's configuration this code reads (export <= {EXPORT})")
    if not isinstance(meta["config"].get("model"), dict):
        raise UserError(f"{path}: no model configuration (config.model); export the model again with export.py")
    return meta


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's shape and dtype from a ``.safetensors`` header, without reading the tensors; the header's
    length and the data it describes are checked against the file's size first."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8:
            raise ValueError(f"its header claims {length} bytes but the file holds {max(size - 8, 0)}")
        with safe_open(path, "pt") as opened:
            return {key: (tuple(opened.get_slice(key).get_shape()), opened.get_slice(key).get_dtype())
                    for key in opened.keys()}  # noqa: SIM118 - safe_open is no mapping
    except (OSError, ValueError, SafetensorError) as error:
        raise UserError(f"{path} is damaged ({first_line(error)}); copy or export it again") from None


def check_export(folder: Path, saved: dict[str, Any]) -> None:
    """Check an export folder's weights and word vectors against its configuration ``saved`` from their headers,
    before any network is built: each size of ``saved["model"]`` must be the size of the tensors it shapes
    (``config_dims`` of its system: an absurd size is refused here, never allocated; the trunk's tensors are
    checked when the weights are loaded); ``words.safetensors`` must have one row per word of ``vocab.txt`` and the
    model's word dimension."""
    shapes = tensor_shapes(folder / WEIGHTS)
    try:
        model = from_dict(ModelConfig, saved["model"])
    except UserError as error:
        raise UserError(f"{folder / CONFIG}: {error}") from None
    for field, key, axis, size in system_class(model.arch).config_dims(model):
        found = shapes.get(key, ((), ""))[0]
        if len(found) <= axis or found[axis] != size:
            raise UserError(f"{folder / CONFIG} does not fit {folder / WEIGHTS}: model.{field} = "
                            f"{getattr(model, field)} makes tensor {key} {size} long on axis {axis}, but it is "
                            f"{list(found) if found else 'missing'} there")
    if saved.get("word_vectors") != WORDS:
        return
    vectors = tensor_shapes(folder / WORDS).get("vectors", ((), ""))[0]
    if len(vectors) != 2:
        raise UserError(f"{folder / WORDS} holds no (words, dimensions) matrix 'vectors'; export the model again")
    rows, dim = vectors
    try:
        words = (folder / VOCAB).read_bytes().count(b"\n")
    except OSError as error:
        raise UserError(f"{folder / VOCAB} cannot be read ({first_line(error)}); export the model again") from None
    if words != rows or dim != saved["model"].get("word_dim", dim):
        raise UserError(f"{folder / WORDS} holds {rows} vectors of {dim} dimensions but {VOCAB} has {words} words "
                        f"and the model reads {saved['model'].get('word_dim')}: the files do not belong together")


# --------------------------------------------------------------------------- the model card

SYSTEMS = {"dsve": "DSVE-Loc (Engilberge, Chevallier, Perez, Cord, CVPR 2018): ResNet + WELDON pooling (eq. 1-3) "
                   "and an SRU over frozen word vectors (eq. 4), trained with a triplet loss (eq. 5-7)",
           "matchmap": "the matchmap system of Das, Ghouse, Verma, Li (2019): a grid of region vectors and an LSTM "
                       "over frozen word vectors, trained with the N-pair loss"}
DATASETS = {"coco": "MS-COCO 2014 images with their captions, Karpathy's splits",
        "flickr30k": "Flickr30k images with their captions, Karpathy's splits",
        "flickr30k_entities": "Flickr30k images with their captions, the Flickr30K Entities split files",
        "demo": "the built-in synthetic demo world (misc/data/demo.py): coloured shapes on textures, "
                "templated captions"}


def card(meta: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The model card (README.md) of an export: the model, its data, its schedule, its numbers, its use and
    limits."""
    saved, model, train = meta["config"], meta["config"]["model"], meta["config"]["train"]
    words = saved.get("words") or {}
    trained_with = words.get("trained_with") or words
    embedded = saved.get("word_vectors") == WORDS
    datasets = config.dataset_names(train["dataset"])
    lines = [f"# {model['arch']} model, {model['trunk']} trunk",
             "", f"Exported from `{meta['source']}` after epoch {meta.get('epoch')}.", "",
             "## Model", "", f"- system: {SYSTEMS[model['arch']]}",
             f"- configuration (models/config.py): {', '.join(f'{k}={v}' for k, v in model.items())}",
             f"- trunk start: {model.get('trunk_init') or 'not recorded'}",
             f"- word vectors: `{trained_with.get('file', saved.get('word_vectors'))}` (sha256 "
             f"{trained_with.get('sha256', 'not recorded')}), "
             + (f"embedded here ({WORDS}, {VOCAB})" if embedded else "referenced only: pass `--words PATH`"),
             "", "## Training data", "",
             *(f"- {DATASETS.get(name, f'`{name}` (a JSON-lines file, data/README.md)')}" for name in datasets),
             f"- trained on split `{train['split']}`, validated on `{train['val_split']}`"
             f"{f' of `{datasets[0]}`' if len(datasets) > 1 else ''}; crops of "
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
               if "demo" in datasets else []), ""]
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
