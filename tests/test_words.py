"""Tokeniser and every supported word-vector file format, written here in their real formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gensim.models import KeyedVectors

from misc.config import ConfigError
from misc.words import load_word_vectors, tokenize

WORDS = ["a", "red", "circle", "UNK", "Dog"]


def keyed(dim: int = 4) -> KeyedVectors:
    vectors = KeyedVectors(vector_size=dim)
    vectors.add_vectors(WORDS, np.arange(len(WORDS) * dim, dtype=np.float32).reshape(len(WORDS), dim))
    return vectors


def test_tokenize_splits_punctuation_and_sentences_without_nltk_data():
    assert tokenize("A man's red hat, on the left. Two dogs!") == [
        "A", "man", "'s", "red", "hat", ",", "on", "the", "left", ".", "Two", "dogs", "!"]
    assert tokenize("   ") == []


@pytest.mark.parametrize("kind", ["word2vec_bin", "word2vec_txt", "glove"])
def test_gensim_formats_load_with_the_same_vectors(tmp_path: Path, kind: str):
    source = keyed()
    path = tmp_path / {"word2vec_bin": "v.bin", "word2vec_txt": "v.txt", "glove": "glove.txt"}[kind]
    if kind == "glove":
        path.write_text("".join(f"{w} {' '.join(map(str, source[w]))}\n" for w in WORDS))
    else:
        source.save_word2vec_format(str(path), binary=kind == "word2vec_bin")
    words = load_word_vectors(path)
    assert words.dim == 4 and len(words) == len(WORDS)
    np.testing.assert_array_equal(words.lookup(["circle"])[0][0], source["circle"])


@pytest.mark.parametrize("pickled", [False, True])
def test_skipthought_table_with_dictionary_and_unk(tmp_path: Path, pickled: bool):
    table = np.random.default_rng(0).normal(size=(len(WORDS), 3)).astype(np.float32)
    if pickled:  # the original release stores an object array
        rows = np.empty(len(WORDS), dtype=object)
        rows[:] = list(table)
        np.save(tmp_path / "utable.npy", rows, allow_pickle=True)
    else:
        np.save(tmp_path / "utable.npy", table)
    (tmp_path / "dictionary.txt").write_text("\n".join(WORDS) + "\n")
    words = load_word_vectors(tmp_path)  # the folder works as well as the file
    matrix, oov = words.lookup(["a", "RED", "zebra", "Dog"])
    assert oov == 1  # RED is found lower-cased, zebra is not found
    np.testing.assert_array_equal(matrix, table[[0, 1, 3, 4]])  # zebra -> the UNK row


def test_encode_pads_counts_oov_and_rejects_empty_captions(tmp_path: Path):
    keyed().save_word2vec_format(str(tmp_path / "v.bin"), binary=True)
    words = load_word_vectors(tmp_path / "v.bin")
    encoded = words.encode(["a red circle", "a zebra"])
    assert encoded.words.shape == (2, 3, 4)
    assert encoded.lengths.tolist() == [3, 2]
    assert encoded.oov == 1 and encoded.tokens == 5
    assert encoded.words[1, 2].abs().sum() == 0  # padding is zeros, never uninitialised memory
    np.testing.assert_array_equal(encoded.words[1, 1].numpy(), words.unk)
    with pytest.raises(ValueError, match="caption 1 has no words"):
        words.encode(["a circle", "  "])


def test_zero_vector_for_oov_when_the_table_has_no_unk(tmp_path: Path):
    vectors = KeyedVectors(vector_size=2)
    vectors.add_vectors(["x"], np.ones((1, 2), dtype=np.float32))
    vectors.save_word2vec_format(str(tmp_path / "v.bin"), binary=True)
    matrix, oov = load_word_vectors(tmp_path / "v.bin").lookup(["y"])
    assert oov == 1 and not matrix.any()


def test_bad_files_give_one_line_errors(tmp_path: Path):
    np.save(tmp_path / "utable.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="dictionary.txt is missing"):
        load_word_vectors(tmp_path / "utable.npy")
    with pytest.raises(ConfigError, match="not found"):
        load_word_vectors(tmp_path / "nothing.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ConfigError, match="could not be read"):
        load_word_vectors(tmp_path / "junk.bin")
