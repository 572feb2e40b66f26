"""Das et al. 2019 as their code runs it: phrases read in their caption's context (the matchmap's
``phrase_filters``), the spans that place a phrase among the caption's tokens, and the das2019 pointing rule."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from misc.data.spans import find_tokens, word_span_tokens
from misc.data.words import tokenize
from misc.errors import UserError
from misc.eval import pointing
from misc.eval.localization import DAS2019
from misc.eval.tally import accuracies
from models.config import ModelConfig
from models.joint import JointEmbedding, build_model
from models.matchmap import Matchmap
from tests.conftest import run_in_process
from tests.test_flickr_entities import entities_pointing, random_checkpoint

TINY = {"arch": "matchmap", "trunk": "resnet18", "trunk_cut": "layer3", "region_dim": 8, "lstm_hidden": 8,
        "word_dim": 5}


def test_an_in_context_filter_is_the_mean_of_the_whole_captions_word_outputs_over_the_span():
    torch.manual_seed(7)
    model = build_model(ModelConfig(**TINY)).eval()
    assert isinstance(model, Matchmap)
    words, lengths = torch.randn(2, 6, 5), torch.tensor([6, 4])
    spans = torch.tensor([[0, 2, 5], [1, 0, 1], [1, 1, 4], [0, 5, 6]])
    with torch.no_grad():
        found = model.phrase_filters(words, lengths, spans)
        for (row, first, end), got in zip(spans.tolist(), found):
            alone = model.text(words[row:row + 1, :lengths[row]], lengths[row:row + 1])[0]  # the caption alone
            torch.testing.assert_close(got, alone[first:end].mean(dim=0))
        # the same words read without the words before them give another filter: the context matters
        phrase_alone = model.text_filters(words[:1, 2:5], torch.tensor([3]))[0]
        assert not torch.allclose(found[0], phrase_alone, atol=1e-4)
        with pytest.raises(ValueError, match="0 <= first < end"):
            model.phrase_filters(words, lengths, torch.tensor([[1, 2, 5]]))  # caption 1 has 4 tokens


def test_dsve_refuses_in_context_filters_in_one_line():
    model = build_model(ModelConfig(trunk="resnet18", maps_dim=8, embed_dim=12, word_dim=4, sru_layers=1))
    assert isinstance(model, JointEmbedding)
    with pytest.raises(NotImplementedError) as refusal:
        model.phrase_filters(torch.randn(1, 3, 4), torch.tensor([3]), torch.tensor([[0, 0, 1]]))
    assert "\n" not in str(refusal.value) and "matchmap" in str(refusal.value)


@pytest.mark.parametrize("caption, first, length, expected", [
    ("A man in a t-shirt , holds his dog's ball .", 3, 2, ["a", "t-shirt"]),  # a hyphenated word is one token
    ("A man in a t-shirt , holds his dog's ball .", 7, 3, ["his", "dog", "'s", "ball"]),  # a clitic split off
    ("A man in a t-shirt , holds his dog's ball .", 0, 1, ["A"]),
    ('A sign says "stop" here', 3, 1, ["``", "stop", "''"]),  # quotes rewritten by the tokeniser
    ("A man can't swim.", 2, 2, ["ca", "n't", "swim", "."]),  # punctuation glued to the last word stays in it
    ("A well-dressed man (left) waves", 2, 2, ["man", "(", "left", ")"]),
])
def test_a_word_span_becomes_the_tokens_of_those_words(caption, first, length, expected):
    tokens = tokenize(caption)
    start, end = word_span_tokens(caption, tokens, first, length)
    assert tokens[start:end] == expected
    assert tokens[start:end] == tokenize(" ".join(caption.split()[first:first + length]))  # as the words alone


def test_spans_outside_the_caption_or_not_embedded_are_errors():
    caption = "A dog runs . A cat sleeps ."
    with pytest.raises(ValueError, match="not in the 8 words"):
        word_span_tokens(caption, tokenize(caption), 7, 2)
    first_sentence = tokenize("A dog runs .")  # the tokens under first-sentence text options
    with pytest.raises(ValueError, match="no embedded token"):
        word_span_tokens(caption, first_sentence, 5, 1)
    assert find_tokens(tokenize(caption), ["a", "CAT"]) == (4, 6)
    assert find_tokens(tokenize(caption), ["a", "bird"]) is None


class Painted:
    """Stands in for :class:`misc.inference.Inference`: fixed two-channel maps (a 2 x 4 grid, not square), and the
    filter of phrase "p<c>" is channel c's indicator, so each phrase's map is one hand-written channel."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.grid = torch.zeros(2, 2, 4)
        self.grid[0, 0, 3] = 1.0  # phrase p0 peaks in cell (row 0, col 3)
        self.grid[1, 1, 0] = 1.0  # phrase p1 peaks in cell (row 1, col 0)

    def transform(self, size: int):
        return lambda image: torch.zeros(3, size, size)

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.grid.expand(len(images), -1, -1, -1)

    def filters(self, texts: list[str], k: int | None = None) -> torch.Tensor:
        return torch.eye(2)[[int(text[1]) for text in texts]]


@pytest.fixture
def two_captions(tmp_path: Path) -> list[pointing.Item]:
    """One 16 x 8 image; caption 0 has phrase p0 with boxes A and B, caption 1 phrase p1 with box B."""
    path = tmp_path / "image.png"
    Image.new("RGB", (16, 8)).save(path)
    box_a, box_b = (12.0, 0.0, 4.0, 2.0), (0.0, 5.0, 4.0, 3.0)  # in the 16 x 8 frame
    return [pointing.Item("image", path, (16.0, 8.0), [
        pointing.Phrase("p0", [box_a, box_b], {"sentence": 0}), pointing.Phrase("p1", [box_b], {"sentence": 1})])]


def test_das2019_scores_each_box_per_caption_then_the_mean_over_captions(two_captions):
    rows = list(pointing.point(Painted(), two_captions, 8, None, DAS2019, 0.0, 1, 0, False))
    # By hand, at 8 x 8 (half-pixel bilinear from the 2 x 4 grid, ties to the first pixel in row-major order):
    # p0's map is 1 at pixels (row 0-1, col 7): arg-max pixel (0, 7), point (7.5, 0.5);
    # p1's map is 1 at pixels (row 6-7, col 0): arg-max pixel (6, 0), point (0.5, 6.5).
    # The boxes at 8 x 8 (x halved): A = [6, 8] x [0, 2], B = [0, 2] x [5, 8].
    assert [r["pixel"] for r in rows] == [[0, 7], [6, 0]]
    assert [r["point"] for r in rows] == [[7.5, 0.5], [0.5, 6.5]]
    assert [r["box_hits"] for r in rows] == [[True, False], [True]]
    metrics = accuracies(rows, 1, 0, DAS2019)
    assert metrics["accuracy"] == pytest.approx(100 * (1 / 2 + 1 / 1) / 2)  # 75 %, not the pooled 2 of 3 boxes
    assert metrics["any_box_accuracy"] == 100.0 and metrics["captions"] == 2 and metrics["boxes"] == 3
    assert metrics["center_baseline"] == 0.0  # pixel (4, 4), point (4.5, 4.5): in neither box
    assert all(r["center_pixel"] == [4, 4] for r in rows)


def test_swap_xy_reads_the_rows_as_x_as_their_code_does(two_captions):
    rows = list(pointing.point(Painted(), two_captions, 8, None, DAS2019, 0.0, 1, 0, False, swap_xy=True))
    # the same arg-max pixels; the points swapped: p0 (0.5, 7.5) is in B not A, p1 (6.5, 0.5) is not in B
    assert [r["pixel"] for r in rows] == [[0, 7], [6, 0]]
    assert [r["point"] for r in rows] == [[0.5, 7.5], [6.5, 0.5]]
    assert [r["box_hits"] for r in rows] == [[False, True], [False]]
    assert accuracies(rows, 1, 0, DAS2019)["accuracy"] == pytest.approx(100 * (1 / 2 + 0) / 2)


@pytest.mark.slow
def test_das2019_pointing_of_a_matchmap_reads_phrases_in_context(tiny_world, tmp_path, monkeypatch):
    path = random_checkpoint(tiny_world, tmp_path / "model.pth.tar", arch="matchmap", trunk_cut="layer3",
                             region_dim=16, lstm_hidden=16)
    status, report = entities_pointing(path, tiny_world, tmp_path / "pg.json", monkeypatch, 3, "das2019")
    assert status == 0 and report["settings"]["context"] == "caption" and report["settings"]["swap_xy"] is False
    rows = report["per_phrase"]
    for row in rows:  # each row carries what both rules need: the pixel, every box and its own hit
        x, y = row["pixel"][1] + 0.5, row["pixel"][0] + 0.5
        assert row["point"] == [x, y]
        assert row["box_hits"] == [bx <= x <= bx + w and by <= y <= by + h for bx, by, w, h in row["boxes"]]
        assert row["hit"] == any(row["box_hits"])
    captions: dict[tuple, list[bool]] = {}
    for row in rows:
        captions.setdefault((row["image_id"], row["sentence"]), []).extend(row["box_hits"])
    expected = 100 * sum(sum(h) / len(h) for h in captions.values()) / len(captions)
    assert report["metrics"]["accuracy"] == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--context", "caption"], "one text vector per sentence"),  # DSVE
    (["--swap-xy"], "needs --protocol das2019"),
    (["--protocol", "das2019", "--dataset", "demo"], "needs --dataset flickr30k_entities"),
])
def test_refusals_are_one_line(tiny_world, tmp_path, monkeypatch, capsys, args, message):
    path = random_checkpoint(tiny_world, tmp_path / "model.pth.tar", maps_dim=16, embed_dim=16, sru_layers=1)
    status = run_in_process("pointing_game.py", ["-p", path, "--limit", "2", "--size", "64", "--workers", "0",
                                                 "--no-progress", "--device", "cpu",
                                                 *(["--dataset", "demo_entities"] if "--dataset" not in args else []),
                                                 *args], tiny_world, monkeypatch)
    error = capsys.readouterr().err.strip()
    assert status != 0 and message in error and "\n" not in error and "Traceback" not in error


def test_inference_refuses_a_phrase_not_in_the_caption_and_dsve_in_one_line(tiny_world, tmp_path):
    from misc.inference import Inference

    matchmap = Inference.load(random_checkpoint(tiny_world, tmp_path / "m.pth.tar", **{
        k: v for k, v in TINY.items() if k not in ("word_dim", "trunk")}), device="cpu")
    with pytest.raises(UserError, match="is not in the caption"):
        matchmap.spans_in("a red circle", ["blue"])
    caption = "a red circle and a blue square"
    torch.testing.assert_close(matchmap.filters_in_context([caption], matchmap.spans_in(caption, ["a blue square"])),
                               matchmap.filters_in_context([caption], [(0, 4, 7)]))
    dsve = Inference.load(random_checkpoint(tiny_world, tmp_path / "d.pth.tar", maps_dim=16, embed_dim=16,
                                            sru_layers=1), device="cpu")
    with pytest.raises(UserError, match="one text vector per sentence") as refusal:
        dsve.filters_in_context([caption], [(0, 0, 1)])
    assert "\n" not in str(refusal.value)


@pytest.mark.slow
def test_localize_maps_every_word_of_a_caption_in_context_and_dsve_refuses(tiny_world, tmp_path, monkeypatch,
                                                                            capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), "red").save(image)
    matchmap = random_checkpoint(tiny_world, tmp_path / "m.pth.tar", arch="matchmap", trunk_cut="layer3",
                                 region_dim=16, lstm_hidden=16)
    common = ["-i", image, "--size", "64", "--device", "cpu"]
    caption = ["--caption", "a red circle , and a blue square"]
    assert run_in_process("localize.py", ["-p", matchmap, *common, *caption, "--per-word", "-o", tmp_path / "w.png"],
                          tiny_world, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "w.png").is_file() and "7 heatmap(s)" in printed  # the comma has no map
    assert [line.split("'")[1] for line in printed.splitlines()[1:]] == ["a", "red", "circle", "and", "a", "blue",
                                                                          "square"]
    assert run_in_process("localize.py", ["-p", matchmap, *common, *caption, "-t", "a blue square", "-o",
                                          tmp_path / "p.png"], tiny_world, monkeypatch) == 0
    assert "1 heatmap(s)" in capsys.readouterr().out
    dsve = random_checkpoint(tiny_world, tmp_path / "d.pth.tar", maps_dim=16, embed_dim=16, sru_layers=1)
    for args in (["-p", dsve, *common, *caption, "--per-word"], ["-p", matchmap, *common, "--per-word"]):
        assert run_in_process("localize.py", [*args, "-o", tmp_path / "x.png"], tiny_world, monkeypatch) != 0
        error = capsys.readouterr().err.strip()
        assert error and "\n" not in error and "Traceback" not in error and not (tmp_path / "x.png").exists()
