"""The matchmap system (Das et al. 2019) against loops over its definitions; the trunks it cuts; the localization
interface both systems share."""
from __future__ import annotations

import pytest
import torch
import torchvision

from misc.errors import UserError
from models.heatmaps import heatmaps as dsve_heatmaps
from models.config import ModelConfig
from models.joint import JointEmbedding, build_model
from models.matchmap import Matchmap, match_scores
from models.trunks import build_trunk

TINY = {"arch": "matchmap", "trunk": "resnet18", "trunk_cut": "layer3", "region_dim": 8, "lstm_hidden": 8,
        "word_dim": 5}


def brute_force_score(regions: torch.Tensor, words: torch.Tensor, length: int, kind: str) -> float:
    """One image (D, h, w) and one caption (T, D): its matchmap element by element, then the pooling by loops."""
    _, h, w = regions.shape
    m = [[[float(words[t] @ regions[:, i, j]) for j in range(w)] for i in range(h)] for t in range(length)]
    if kind == "avg_both":
        return sum(sum(sum(row) for row in m[t]) / (h * w) for t in range(length)) / length
    if kind == "max_img":
        return sum(max(max(row) for row in m[t]) for t in range(length)) / length
    return sum(max(m[t][i][j] for t in range(length)) for i in range(h) for j in range(w)) / (h * w)


@pytest.mark.parametrize("kind", ["avg_both", "max_img", "max_text"])
def test_scores_match_a_loop_over_every_pair_and_ignore_padding(kind):
    torch.manual_seed(0)
    regions = torch.randn(3, 6, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 2, 3])
    words = torch.randn(4, 4, 6, dtype=torch.float64)
    got = match_scores(regions, words, lengths, kind)
    expected = torch.tensor([[brute_force_score(regions[i], words[j], int(lengths[j]), kind) for j in range(4)]
                             for i in range(3)], dtype=torch.float64)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected)
    padded = words.clone()
    for row, length in enumerate(lengths):
        padded[row, length:] = 50.0  # whatever sits after a caption's end is not read
    torch.testing.assert_close(match_scores(regions, padded, lengths, kind), got)


def test_the_three_scores_differ():
    torch.manual_seed(1)
    regions, words, lengths = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 4), torch.tensor([5, 3])
    scores = [match_scores(regions, words, lengths, kind) for kind in ("avg_both", "max_img", "max_text")]
    assert not torch.allclose(scores[0], scores[1]) and not torch.allclose(scores[1], scores[2])


@pytest.mark.parametrize("trunk, cut, channels, grid", [("vgg19", "conv5", 512, 14), ("vgg19", "conv4", 512, 28),
                                                         ("resnet50", "layer3", 1024, 14),
                                                         ("resnet50", "", 2048, 7)])
def test_grid_trunks_give_the_papers_grids_at_224(trunk, cut, channels, grid):
    built = build_trunk(trunk, cut)
    module, dim, dropped = built.module, built.channels, built.dropped
    assert dim == channels
    with torch.no_grad():
        assert module.eval()(torch.randn(1, 3, 224, 224)).shape == (1, channels, grid, grid)
    # the trunk and the dropped keys account for every key of torchvision's whole network, with its names
    full = torchvision.models.get_model(trunk).state_dict().keys()
    assert set(module.state_dict()) <= set(full)
    assert {key for key in full if not key.startswith(dropped)} == set(module.state_dict())


def test_a_cut_trunk_starts_from_a_whole_torchvision_file(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    model = build_model(ModelConfig(**TINY, trunk_init=f"file:{tmp_path / 'resnet18.pth'}"), init_trunk=True)
    torch.testing.assert_close(model.image.trunk.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert not hasattr(model.image.trunk, "layer4")


@pytest.mark.parametrize("values, message", [
    ({"trunk_cut": "layer5"}, "model.trunk_cut = 'layer5': unknown"),
    ({"trunk": "vgg19", "trunk_cut": "layer3"}, "model.trunk_cut = 'layer3': unknown"),
    ({"lstm_hidden": 16}, "model.lstm_hidden = 16 but model.region_dim = 8"),
    ({"score": "max_both"}, "model.score = 'max_both': unknown"),
    ({"arch": "dsve"}, "trunk_cut is for model.arch=matchmap"),
])
def test_bad_matchmap_configs_are_one_line(values, message):
    with pytest.raises(UserError, match=message):
        build_model(ModelConfig(**{**TINY, **values}))


def test_model_parts_mask_padding_and_score_through_the_config():
    torch.manual_seed(2)
    model = build_model({**TINY, "score": "max_text"}).eval()
    assert isinstance(model, Matchmap) and build_model(ModelConfig(**TINY)).state_dict().keys() == \
        model.state_dict().keys()
    images, words, lengths = torch.randn(2, 3, 64, 96), torch.randn(3, 6, 5), torch.tensor([6, 2, 4])
    with torch.no_grad():
        regions, vectors = model(images, words, lengths)
        assert regions.shape == (2, 8, 4, 6) and vectors.shape == (3, 6, 8)  # layer3: stride 16
        assert bool((regions >= 0).all())  # after the ReLU
        assert bool((vectors[1, 2:] == 0).all()) and bool((vectors[2, 4:] == 0).all())
        alone = model.text(words[1:2, :2], lengths[1:2])
        torch.testing.assert_close(vectors[1:2, :2], alone)
        torch.testing.assert_close(model.score(regions, vectors, lengths),
                                   match_scores(regions, vectors, lengths, "max_text"))


def test_a_phrase_heatmap_is_the_mean_of_its_word_matchmaps():
    torch.manual_seed(4)
    model = build_model(ModelConfig(**TINY)).eval()
    images, words, lengths = torch.randn(2, 3, 64, 64), torch.randn(3, 4, 5), torch.tensor([4, 1, 3])
    with torch.no_grad():
        heat = model.heatmaps(images, words, lengths)  # (2, 3, 4, 4)
        regions, vectors = model(images, words, lengths)
        for q in range(3):
            per_word = torch.einsum("bchw,tc->bthw", regions, vectors[q])  # M[t] on each image (2, T, h, w)
            torch.testing.assert_close(heat[:, q], per_word[:, :lengths[q]].mean(dim=1))
    assert heat.shape == (2, 3, 4, 4)


def test_dsve_heatmaps_through_the_shared_interface_are_eq_9():
    torch.manual_seed(5)
    model = build_model(ModelConfig(trunk="resnet18", maps_dim=8, embed_dim=12, word_dim=4, sru_layers=1)).eval()
    assert isinstance(model, JointEmbedding)
    images, words, lengths = torch.randn(2, 3, 64, 64), torch.randn(3, 4, 4), torch.tensor([4, 2, 3])
    with torch.no_grad():
        expected = dsve_heatmaps(model.image.feature_maps(images), model.image.proj.weight,
                                 model.text(words, lengths), 5)
        torch.testing.assert_close(model.heatmaps(images, words, lengths, k=5), expected)
        embedded = model(images, words, lengths)
        torch.testing.assert_close(model.score(*embedded), embedded[0] @ embedded[1].t())
    with pytest.raises(ValueError, match="need k"):
        model.text_filters(words, lengths)
