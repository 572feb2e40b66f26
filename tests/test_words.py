"""Tokeniser and every supported word-vector file format, written here in their real formats."""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from gensim.models import KeyedVectors

from misc.errors import UserError
from misc.data.words import ORIGINAL_TEXT, WordVectors, load_word_vectors, sentences, tokenize

WORDS = ["a", "red", "circle", "UNK", "Dog"]


def keyed(dim: int = 4) -> KeyedVectors:
    vectors = KeyedVectors(vector_size=dim)
    vectors.add_vectors(WORDS, np.arange(len(WORDS) * dim, dtype=np.float32).reshape(len(WORDS), dim))
    return vectors


def test_tokenize_splits_punctuation_and_sentences_without_nltk_data():  # no nltk.download anywhere
    assert tokenize("A man's red hat, on the left. Two dogs!") == [
        "A", "man", "'s", "red", "hat", ",", "on", "the", "left", ".", "Two", "dogs", "!"]
    assert tokenize("   ") == []


@pytest.mark.parametrize("caption, abbreviation", [("Dr. Pepper can on a table.", "Dr."),
                                                   ("A St. Bernard lying on grass.", "St."),
                                                   ("U.S. Army truck parked outside.", "U.S.")])
def test_trained_english_punkt_keeps_abbreviations_inside_the_first_sentence(caption, abbreviation):
    """The original release embeds the first sentence only: an untrained Punkt cut these captions after the
    abbreviation, leaving one or two words."""
    assert sentences(caption) == [caption]
    first = WordVectors(keyed(), Path("table"), ORIGINAL_TEXT).tokens(caption)
    assert first == tokenize(caption) and first[-1] == "."
    words = caption.split()
    assert first[first.index(abbreviation) + 1] == words[words.index(abbreviation) + 1]  # the word after it


def test_a_real_second_sentence_is_still_dropped_by_the_original_preprocessing():
    caption = "A man rides a horse. The sky is blue."
    assert sentences(caption) == ["A man rides a horse.", "The sky is blue."]
    first = WordVectors(keyed(), Path("table"), ORIGINAL_TEXT).tokens(caption)
    assert first == ["A", "man", "rides", "a", "horse", "."]


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


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as numpy under Python 2 pickled array data."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, data: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(data)

    dispatch[bytes] = save_bytes


def write_pickled_npy(path: Path, header_of: np.ndarray, payload: bytes) -> None:
    """An .npy file: the header of ``header_of`` (an object array), then ``payload`` as its pickle."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(header_of))
        handle.write(payload)


def object_rows(table: np.ndarray) -> np.ndarray:
    rows = np.empty(len(table), dtype=object)
    rows[:] = list(table)
    return rows


@pytest.mark.parametrize("layout", ["numbers", "object_array", "python2_object_array"])
def test_skipthought_table_with_dictionary_and_unk(tmp_path: Path, layout: str):
    table = np.random.default_rng(0).normal(size=(len(WORDS), 3)).astype(np.float32)
    if layout == "numbers":
        np.save(tmp_path / "utable.npy", table)
    elif layout == "object_array":  # one array per row, as numpy 2 pickles it
        np.save(tmp_path / "utable.npy", object_rows(table), allow_pickle=True)
    else:  # the released utable.npy: pickled by Python 2 and numpy 1 (numpy.core module names, str data)
        buffer = io.BytesIO()
        Python2Pickler(buffer, protocol=2).dump(object_rows(table))
        payload = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct" in payload and pickle.BINSTRING in payload
        write_pickled_npy(tmp_path / "utable.npy", object_rows(table), payload)
    (tmp_path / "dictionary.txt").write_text("\n".join(WORDS) + "\n")
    words = load_word_vectors(tmp_path)  # the folder works as well as the file
    matrix, oov = words.lookup(["a", "RED", "zebra", "Dog"])
    assert oov == 1  # RED is found lower-cased, zebra is not found
    np.testing.assert_array_equal(matrix, table[[0, 1, 3, 4]])  # zebra -> the UNK row
    assert words.vectors.index_to_key == WORDS and words.vectors.vectors.shape == table.shape  # no empty rows


class WritesMarker:
    """Pickles as a call of ``exec`` that writes a file: what a crafted table could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_crafted_table_is_refused_without_running_code(tmp_path: Path):
    table = tmp_path / "utable.npy"
    write_pickled_npy(table, object_rows(np.zeros((2, 3))), pickle.dumps(WritesMarker(tmp_path / "ran.txt")))
    (tmp_path / "dictionary.txt").write_text("a\nUNK\n")
    with pytest.raises(UserError, match=r"utable\.npy holds Python objects \(builtins\.exec\)") as error:
        load_word_vectors(table)
    assert "\n" not in str(error.value) and str(table) in str(error.value)
    assert not (tmp_path / "ran.txt").exists()
    np.load(table, allow_pickle=True)  # what loading it with numpy's own unpickling does
    assert (tmp_path / "ran.txt").read_text() == "ran"


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
    with pytest.raises(UserError, match="dictionary.txt is missing"):
        load_word_vectors(tmp_path / "utable.npy")
    with pytest.raises(UserError, match="not found"):
        load_word_vectors(tmp_path / "nothing.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="could not be read"):
        load_word_vectors(tmp_path / "junk.bin")
