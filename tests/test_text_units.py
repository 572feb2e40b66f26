"""Das et al.'s text input: a caption's annotated phrases as single LSTM steps (``model.text_units: phrases``, their
code's parse_mode "phrase") and random vectors for unknown words drawn from the table (``model.unknown_words``),
kept in the checkpoint."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from misc import config
from misc.config import TrainConfig
from misc.data import flickr_entities
from misc.data.jsonl import with_regions
from misc.data.spans import Caption, phrase_steps, step_span, word_span_tokens
from misc.data.words import UNK, WordVectors, load_word_vectors
from misc.errors import UserError
from misc.eval.encode import caption_batches
from misc.inference import Inference, as_image
from misc.store import checkpoint
from misc.train import distributed
from misc.train.run import RunOptions, load_data
from misc.train.state import Resume
from models.config import ModelConfig
from models.heatmaps import apply_filters
from models.joint import build_model
from tests.conftest import run_in_process

WORDS = ["a", "man", "with", "pierced", "ears", ".", "dog", "runs"]
TINY = {"arch": "matchmap", "trunk": "resnet18", "trunk_cut": "layer2", "region_dim": 8, "lstm_hidden": 8,
        "word_dim": 4}


def table(units: str = "words") -> WordVectors:
    """Eight known words with distinct 4-d vectors (row i = i + [0, 0.1, 0.2, 0.3])."""
    vectors = KeyedVectors(vector_size=4)
    vectors.add_vectors(WORDS, np.arange(len(WORDS), dtype=np.float32)[:, None] + np.float32([0, 0.1, 0.2, 0.3]))
    return WordVectors(vectors, Path("table.txt"), units=units)


def test_a_bracketed_phrase_holds_its_characters_and_its_tokens_become_one_step():
    sentence = flickr_entities.parse_sentence("[/EN#1/people A man] with [/EN#2/bodyparts pierced ears] .")
    assert sentence.text == "A man with pierced ears ." and sentence.text.phrases == ((0, 5), (11, 23))
    tokens = ["A", "man", "with", "pierced", "ears", "."]
    assert phrase_steps(sentence.text, tokens) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert phrase_steps("A man with pierced ears .", tokens) == [(t, t + 1) for t in range(6)]  # no phrases
    # a phrase whose word carries punctuation keeps its split-off tokens in its step
    caption = Caption("his dog's ball , here", [(0, 14)])
    assert phrase_steps(caption, ["his", "dog", "'s", "ball", ",", "here"]) == [(0, 4), (4, 5), (5, 6)]
    assert step_span([(0, 2), (2, 3), (3, 5), (5, 6)], 3, 5) == (2, 3)  # "pierced ears" is step 2
    assert step_span([(0, 2), (2, 3), (3, 5), (5, 6)], 1, 3) == (0, 2)  # tokens across two steps
    assert pickle.loads(pickle.dumps(sentence.text)).phrases == ((0, 5), (11, 23))  # to data loader workers


def test_a_phrase_step_is_the_mean_of_its_words_vectors():
    words = table("phrases")
    caption = flickr_entities.parse_sentence("[/EN#1/people A man] with [/EN#2/bodyparts pierced ears] .").text
    encoded = words.encode([caption])
    vector = {word: words.vectors.vectors[row] for row, word in enumerate(WORDS)}  # the table's rows
    expected = [(vector["a"] + vector["man"]) / 2, vector["with"], (vector["pierced"] + vector["ears"]) / 2,
                vector["."]]
    assert encoded.lengths.tolist() == [4] and encoded.tokens == 6
    torch.testing.assert_close(encoded.words[0], torch.tensor(np.stack(expected)))


def test_a_caption_without_phrases_reads_as_words_through_training_and_retrieval_encoding():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, text_units="phrases")).eval()
    captions = ["a dog runs .", "a man with pierced ears", Caption("a dog runs", [])]
    plain, phrased = table("words"), table("phrases")
    pairs = [(phrased.encode(captions), plain.encode(captions))]  # training's collate, the app, localization
    batches = zip(caption_batches(captions, phrased, 2), caption_batches(captions, plain, 2))
    pairs += [(a, b) for (_, a), (_, b) in batches]
    for encoded, reference in pairs:  # the second and third: retrieval's length-sorted batches
        assert torch.equal(encoded.words, reference.words) and torch.equal(encoded.lengths, reference.lengths)
        with torch.no_grad():
            assert torch.equal(model.text_vectors(encoded.words, encoded.lengths),
                               model.text_vectors(reference.words, reference.lengths))
    # under words, a caption's phrases are ignored: one step per token
    caption = flickr_entities.parse_sentence("[/EN#1/people A man] runs").text
    assert plain.encode([caption]).lengths.tolist() == [3] and phrased.encode([caption]).lengths.tolist() == [2]


def test_json_lines_region_phrases_are_found_in_their_captions():
    caption = with_regions("A red ball, on the grass.", ["a red ball", "the grass", "a cat"])
    assert isinstance(caption, Caption) and caption.phrases == ((0, 10), (15, 24))
    assert caption[0:10] == "A red ball" and caption[15:24] == "the grass"
    assert phrase_steps(caption, ["A", "red", "ball", ",", "on", "the", "grass", "."]) == [
        (0, 3), (3, 4), (4, 5), (5, 7), (7, 8)]
    assert not isinstance(with_regions("a dog", ["a cat"]), Caption)  # no phrase in it: the plain caption


def test_phrases_are_refused_for_dsve_in_one_line():
    with pytest.raises(UserError) as refusal:
        ModelConfig(text_units="phrases")
    assert "\n" not in str(refusal.value) and "model.text_units" in str(refusal.value)
    with pytest.raises(UserError, match="model.unknown_words = 'gaussian'"):
        ModelConfig(unknown_words="gaussian")


def generated(rows: int, seed: int = 5) -> tuple[WordVectors, np.ndarray, np.ndarray]:
    """A 3-d table of ``rows`` words w0, w1, ... drawn from a normal of known mean and std per dimension."""
    mean, std = np.array([1.0, -2.0, 0.5]), np.array([0.5, 2.0, 0.1])
    vectors = KeyedVectors(vector_size=3)
    drawn = np.random.default_rng(seed).normal(size=(rows, 3)) * std + mean
    vectors.add_vectors([f"w{i}" for i in range(rows)], drawn.astype(np.float32))
    return WordVectors(vectors, Path("generated.txt")), mean, std


def test_random_unknown_words_follow_the_tables_mean_and_std_per_seed():
    words, mean, std = generated(4000)
    known = words.vectors.vectors.copy()
    unknown = [f"u{i}" for i in range(3000)]
    captions = [" ".join(unknown[i:i + 30]) + " w0 w1" for i in range(0, 3000, 30)]
    assert words.draw_unknown(captions, seed=11) == 3001  # every unknown word, and UNK (the table has none)
    rows = np.stack([words.vectors[word] for word in unknown])
    table_mean, table_std = known.mean(axis=0), known.std(axis=0)  # of the table, computed here
    assert (np.abs(rows.mean(axis=0) - table_mean) < 4 * table_std / np.sqrt(3000)).all()  # 4 standard errors
    np.testing.assert_allclose(rows.std(axis=0), table_std, rtol=0.06)
    assert (np.abs(table_mean - mean) < 4 * std / np.sqrt(4000)).all()  # the table is what it was made from
    assert np.array_equal(words.vectors.vectors[:4000], known)  # known words untouched
    matrix, missing = words.lookup(["u7", "w3", "never-seen"])
    assert missing == 1 and np.array_equal(matrix[0], words.vectors["u7"]) and np.array_equal(matrix[1], known[3])
    assert np.array_equal(matrix[2], words.vectors[UNK]) and np.abs(matrix[2]).sum() > 0  # a later unknown: UNK
    again, other = generated(4000)[0], generated(4000)[0]
    again.draw_unknown(captions, seed=11)
    other.draw_unknown(captions, seed=12)
    assert np.array_equal(again.vectors["u5"], words.vectors["u5"])
    assert not np.allclose(other.vectors["u5"], words.vectors["u5"])


def test_drawn_words_are_kept_in_the_checkpoint_and_added_back_on_loading(tmp_path: Path):
    words, _, _ = generated(50)
    source = tmp_path / "table.txt"
    words.vectors.save_word2vec_format(str(source), write_header=False)
    words = load_word_vectors(source)
    words.draw_unknown(["u1 w2 u2", "u1"], seed=3)
    state = {"format": "dsve-loc", "version": 1, "model": {}, "added_words": words.added_rows(),
             "config": {"model": {**TINY, "word_dim": 3, "text_units": "phrases"}, "train": {},
                        "word_vectors": str(source)}}
    checkpoint.atomic_save(state, tmp_path / "state.pth.tar")
    loaded = checkpoint.load_words(checkpoint.read(tmp_path / "state.pth.tar"), checkpoint_path="state")
    assert sorted(loaded.added) == [UNK, "u1", "u2"] and loaded.units == "phrases"
    for word in ("u1", "u2", UNK, "w2"):
        assert np.array_equal(loaded.vectors[word], words.vectors[word])


@pytest.mark.slow
def test_a_phrase_model_trains_and_points_in_context_end_to_end(tiny_world: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capsys):
    entities = tiny_world / "flickr30k_entities"
    monkeypatch.setenv("DSVE_FLICKR_ENTITIES", str(entities))
    monkeypatch.setenv("DSVE_FLICKR_IMAGES", str(entities / "images"))
    run = tmp_path / "run"
    args = ["--preset", "demo-matchmap", "--dataset", "flickr30k_entities", "--split", "train", "--val-split", "val",
            "--words", tiny_world / "words" / "demo_word2vec.bin", "--set", "model.trunk_cut=layer2",
            "--set", "model.region_dim=16", "--set", "model.lstm_hidden=16", "--set", "model.text_units=phrases",
            "--set", "model.unknown_words=random", "--set", "train.crop_size=64", "--set", "train.eval_size=64",
            "--set", "train.batch_size=8", "--epochs", "1", "--workers", "0", "--no-progress", "--device", "cpu",
            "--out", run]
    assert run_in_process("train.py", args, tiny_world, monkeypatch) == 0
    state = checkpoint.load(run / "best.pth.tar")
    assert state["config"]["model"]["text_units"] == "phrases"
    model = Inference.load(run / "best.pth.tar", device="cpu")
    assert model.words.units == "phrases" and UNK in state["added_words"]["words"]
    checkpoint.export_file(run / "best.pth.tar", tmp_path / "export")  # the drawn rows go into its word table
    exported = Inference.load(tmp_path / "export", device="cpu")
    for word, vector in zip(state["added_words"]["words"], state["added_words"]["vectors"]):
        assert np.array_equal(model.words.vectors[word], vector.numpy())
        assert np.array_equal(exported.words.vectors[word], vector.numpy())
    assert exported.words.units == "phrases"
    with pytest.raises(UserError, match="export it without --words-ref"):
        checkpoint.export_file(run / "best.pth.tar", tmp_path / "reference", words_ref=True)
    # a caption's phrase read in context is the LSTM output at its one step
    sentences = next((entities / "Sentences").glob("*.txt"))
    sentence = flickr_entities.read_sentences(sentences)[0]
    phrase = next(p for p in sentence.phrases if len(p.text.split()) > 1)
    tokens = model.words.tokens(sentence.text)
    span = word_span_tokens(sentence.text, tokens, phrase.first_word, len(phrase.text.split()))
    steps = phrase_steps(sentence.text, tokens)
    assert span in steps and span[1] - span[0] == len(phrase.text.split())  # the phrase's words: one step
    inputs = torch.tensor(np.stack([model.words.lookup(tokens[a:b])[0].mean(axis=0) for a, b in steps]))[None]
    with torch.no_grad():
        expected = model.model.text(inputs, torch.tensor([len(steps)]))[0, steps.index(span)]
        found = model.filters_in_context([sentence.text], [(0, *span)])[0]
    torch.testing.assert_close(found, expected)
    # localize.py --caption: the phrase given with a plain caption is one step too
    image = entities / "images" / f"{sentences.stem}.jpg"
    given = model.heatmaps(image, [phrase.text], caption=str(sentence.text)).maps[0]
    maps = model.maps(model.transform(model.localization_size)(as_image(image))[None])
    torch.testing.assert_close(given, apply_filters(maps, expected[None])[0, 0])
    assert run_in_process("pointing_game.py", ["-p", run / "best.pth.tar", "--dataset", "demo_entities", "--split",
                                               "test", "--limit", "3", "--workers", "0", "--device", "cpu",
                                               "--no-progress"], tiny_world, monkeypatch) == 0
    assert "accuracy" in capsys.readouterr().out.lower()


def test_config_names_glove_6b_300d():
    assert config.PATHS["glove_vectors"].default.name == "glove.6B.300d.txt"


def test_a_new_run_draws_unknown_words_and_a_resumed_one_reads_its_checkpoints(tiny_world: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    for key, path in list(config.DEMO_PATHS.items()):
        monkeypatch.setitem(config.DEMO_PATHS, key, tiny_world / path.relative_to(config.DEMO_DIR))
    monkeypatch.setattr(config, "DEMO_DIR", tiny_world)
    cfg = TrainConfig(dataset="demo", split="train", batch_size=8, workers=0, crop_size=32, seed=4)
    model_cfg = ModelConfig(**{**TINY, "word_dim": 64}, unknown_words="random")
    context = distributed.Context(0, 1, torch.device("cpu"))
    fresh = load_data(model_cfg, cfg, RunOptions(out=Path("unused")), context).words
    assert UNK in fresh.added  # the demo table has no UNK row: one is drawn
    kept = {"words": ["zzz", UNK], "vectors": torch.arange(128, dtype=torch.float32).reshape(2, 64)}
    resumed = load_data(model_cfg, cfg, RunOptions(out=Path("unused"), resume=Resume(Path("last.pth.tar"),
                                                                                     {"added_words": kept})),
                        context).words
    assert resumed.added == ["zzz", UNK]  # nothing drawn anew
    assert np.array_equal(resumed.vectors["zzz"], np.arange(64)) and np.array_equal(resumed.unk, np.arange(64, 128))
    assert not load_data(ModelConfig(**{**TINY, "word_dim": 64}), cfg, RunOptions(out=Path("unused")),
                         context).words.added  # zero: the table as it is
