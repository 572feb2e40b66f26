"""Export folders (misc/store/export.py, export.py) and word-vector references that survive a copied checkpoint."""
from __future__ import annotations

import importlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from misc.store import checkpoint, word_refs
from misc import cli, config
from misc.config import TrainConfig
from misc.errors import UserError
from misc.inference import Inference
from models.config import ModelConfig
from models.joint import build_model

WORDS = ["a", "red", "blue", "circle", "square", "left", "UNK"]
TEXTS = ["a red circle", "a blue square on the left"]


def write_words(path: Path, seed: int) -> Path:
    """A word2vec text file of 8-d vectors for :data:`WORDS`."""
    generator = torch.Generator().manual_seed(seed)
    rows = [f"{word} {' '.join(f'{v:.5f}' for v in torch.randn(8, generator=generator).tolist())}" for word in WORDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(WORDS)} 8\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root holding words/tiny.txt."""
    root = tmp_path / "data"
    monkeypatch.setattr(config, "DATA", root)
    write_words(root / "words" / "tiny.txt", seed=1)
    return root


@pytest.fixture
def trained(data_root: Path, tmp_path: Path) -> Path:
    """A training checkpoint of a tiny model (with its Adam state) naming data_root's words, and a results.json."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(trunk="resnet18", maps_dim=16, embed_dim=16, weldon_k=0.2, word_dim=8, sru_layers=1)
    model = build_model(model_cfg)
    optimizer = torch.optim.Adam(model.parameters())
    sum(parameter.sum() for parameter in model.parameters()).backward()
    optimizer.step()
    stored, reference = word_refs.reference(data_root / "words" / "tiny.txt")
    run = tmp_path / "run"
    checkpoint.atomic_save({"format": "dsve-loc", "version": 1, "epoch": 3, "best_rsum": 42.5,
                            "config": {"model": asdict(model_cfg),
                                       "train": asdict(TrainConfig(dataset="demo", test_size=64)),
                                       "word_vectors": stored, "words": reference},
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "metrics": {"val": {"full": {"rsum": 42.5}}}}, run / "best.pth.tar")
    (run / "results.json").write_text(json.dumps({"retrieval": {"full": {"caption_retrieval": {"R@1": 12.5}}}}))
    return run / "best.pth.tar"


def embeddings(path: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    model = Inference.load(path, device="cpu", **kwargs)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    return model.embed_images(images), model.embed_texts(TEXTS)


def test_an_export_embeds_as_its_checkpoint_and_is_smaller(trained: Path, data_root: Path, tmp_path: Path):
    out = tmp_path / "exported"
    written = {path.name for path in checkpoint.export_file(trained, out)}
    assert written == {"model.safetensors", "config.json", "words.safetensors", "vocab.txt", "README.md"}
    expected_side = embeddings(trained)  # read from the source word2vec file under the data root
    shutil.rmtree(data_root)  # the export carries its own word vectors
    for got, expected in zip(embeddings(out), expected_side, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (out / "model.safetensors").stat().st_size < 0.5 * trained.stat().st_size  # no Adam moments
    meta = json.loads((out / "config.json").read_text())
    assert "optimizer" not in meta and meta["config"]["words"]["trained_with"]["file"] == "tiny.txt"
    assert (out / "vocab.txt").read_text().split() == WORDS
    card = (out / "README.md").read_text()
    assert "synthetic demo world" in card and "| retrieval / full / caption_retrieval / R@1 | 12.5 |" in card
    assert "sha256" in card and "## Limitations" in card and "## Intended use" in card
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_an_export_by_reference_needs_the_words(trained: Path, data_root: Path, tmp_path: Path):
    out = tmp_path / "exported"
    checkpoint.export_file(trained, out, words_ref=True)
    assert not (out / "words.safetensors").exists()
    assert sum(path.stat().st_size for path in out.iterdir()) < trained.stat().st_size
    for got, expected in zip(embeddings(out), embeddings(trained), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (data_root / "words" / "tiny.txt").unlink()
    with pytest.raises(UserError, match=r"needs word vectors 'tiny.txt' \(sha256 [0-9a-f]{12}; .*pass --words PATH"):
        Inference.load(out).embed_texts(TEXTS)


def test_exporting_again_replaces_an_export_only(trained: Path, tmp_path: Path):
    out = tmp_path / "exported"
    checkpoint.export_file(trained, out, words_ref=True)
    checkpoint.export_file(trained, out)
    assert (out / "words.safetensors").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an export folder"):
        checkpoint.export_file(trained, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_export_cli(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    main = importlib.import_module("export").main
    cli.run(main, ["-p", str(trained), "-o", str(tmp_path / "exported")])
    assert "model.safetensors" in capsys.readouterr().out
    assert "epoch: 3" in checkpoint.describe(tmp_path / "exported")


def test_a_copied_checkpoint_finds_its_words_under_another_data_root(trained: Path, data_root: Path,
                                                                      tmp_path: Path, monkeypatch):
    assert checkpoint.load(trained)["config"]["word_vectors"] == "words/tiny.txt"
    elsewhere = tmp_path / "machine2"
    shutil.copytree(data_root, elsewhere / "data")
    shutil.copy(trained, elsewhere / "model.pth.tar")
    shutil.rmtree(data_root)
    monkeypatch.setattr(config, "DATA", elsewhere / "data")
    state = checkpoint.load(elsewhere / "model.pth.tar")
    assert checkpoint.load_words(state, None, elsewhere / "model.pth.tar").source == elsewhere / "data/words/tiny.txt"


def test_missing_words_are_one_line_naming_words_and_the_key(trained: Path, data_root: Path):
    (data_root / "words" / "tiny.txt").unlink()
    state = checkpoint.load(trained)
    with pytest.raises(UserError) as error:
        checkpoint.load_words(state, None, trained)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    digest = state["config"]["words"]["sha256"]
    for part in ("'tiny.txt'", digest[:12], "config.word_vectors", str(data_root), "--words PATH", str(trained)):
        assert part in message


def test_a_different_file_is_an_error_found_and_a_warning_given(trained: Path, data_root: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture):
    """Found by itself, a file whose sha256 differs is refused: the vectors would be silently wrong. Given with
    --words it is used with a warning: the user chose it, and the same vectors in another format differ by bytes."""
    state = checkpoint.load(trained)
    other = write_words(tmp_path / "other.txt", seed=2)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.load_words(state, other, trained).source == other
    assert "is not the file" in caplog.text and state["config"]["words"]["sha256"][:12] in caplog.text
    write_words(data_root / "words" / "tiny.txt", seed=2)
    with pytest.raises(UserError, match="has another sha256 .*--words PATH"):
        checkpoint.load_words(state, None, trained)


def test_an_old_checkpoint_with_an_absolute_path_still_loads(trained: Path, data_root: Path, tmp_path: Path):
    state = checkpoint.load(trained)
    config_ = {key: value for key, value in state["config"].items() if key != "words"}
    config_["word_vectors"] = str(data_root / "words" / "tiny.txt")
    checkpoint.atomic_save({**state, "config": config_}, tmp_path / "old.pth.tar")
    old = checkpoint.load(tmp_path / "old.pth.tar")
    assert checkpoint.load_words(old, None, tmp_path / "old.pth.tar").source == data_root / "words" / "tiny.txt"


def test_a_checkpoint_finds_its_words_where_training_read_them_last(trained: Path, data_root: Path, tmp_path: Path,
                                                                    monkeypatch):
    """Another data root without the file (an installed command run elsewhere on the same machine): the path the
    file had at training time is tried last, and only a file of the recorded sha256 is taken there."""
    source = data_root / "words" / "tiny.txt"
    state = checkpoint.load(trained)
    assert state["config"]["words"]["path"] == str(source.resolve())
    monkeypatch.setattr(config, "DATA", tmp_path / "elsewhere" / "data")
    assert checkpoint.load_words(state, None, trained).source == source.resolve()
    write_words(source, seed=2)
    with pytest.raises(UserError, match="has another sha256"):
        checkpoint.load_words(state, None, trained)
