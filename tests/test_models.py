"""The network parts against direct definitions of the paper's equations."""
from __future__ import annotations

import pytest
import torch

from misc.config import ModelConfig
from models.joint import build_model
from models.text import TextEncoder
from models.visual import ImageEncoder
from models.weldon import build_pooling, weldon_pool


def weldon_by_sorting(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 2 written directly: sort every map's activations, average the k largest and the k smallest."""
    ordered = maps.flatten(2).sort(dim=-1).values
    return ordered[..., -k:].mean(-1) + ordered[..., :k].mean(-1)


@pytest.mark.parametrize("k, positions", [(1, 1), (3, 3), (15, 1), (0.25, 4)])
def test_weldon_matches_direct_definition_values_and_gradients(k, positions):
    torch.manual_seed(0)
    shape = (2, 5, 4, 6)
    count = k if k >= 1 else round(k * 24)
    maps = torch.randn(shape, requires_grad=True)
    reference_maps = maps.detach().clone().requires_grad_(True)
    pooled = weldon_pool(maps, k)
    reference = weldon_by_sorting(reference_maps, min(count, 24))
    assert pooled.shape == (2, 5)
    torch.testing.assert_close(pooled, reference)
    weights = torch.randn(2, 5)
    (pooled * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(maps.grad, reference_maps.grad)


def test_weldon_k_larger_than_map_uses_every_position():
    maps = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(weldon_pool(maps, 15), 2 * maps.mean(dim=(2, 3)))


def test_gap_pooling_is_spatial_mean():
    maps = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(build_pooling("gap", 15)(maps), maps.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("max", 15)


@pytest.mark.parametrize("trunk, trunk_dim", [("resnet18", 512), ("resnet50", 2048)])
def test_image_path_shapes_and_unit_norm_on_non_square_input(trunk, trunk_dim):
    torch.manual_seed(0)
    encoder = ImageEncoder(trunk, maps_dim=24, embed_dim=16, pooling="weldon", weldon_k=2, dropout=0.5).eval()
    assert encoder.adapt.in_channels == trunk_dim
    images = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        maps = encoder.feature_maps(images)
        embedded = encoder(images)
    assert maps.shape == (2, 24, 3, 5)  # stride 32
    assert embedded.shape == (2, 16)
    torch.testing.assert_close(embedded.norm(dim=1), torch.ones(2))
    # eq. 1 evaluated directly from the maps
    direct = encoder.proj(weldon_by_sorting(maps, 2))
    torch.testing.assert_close(embedded, direct / direct.norm(dim=1, keepdim=True))


def test_unknown_trunk_is_rejected():
    with pytest.raises(ValueError, match="unknown trunk"):
        ImageEncoder("vgg16", 8, 8, "weldon", 1, 0.0)


def test_text_path_reads_the_last_real_token_of_padded_captions():
    torch.manual_seed(0)
    encoder = TextEncoder(word_dim=6, embed_dim=8, layers=2, dropout=0.25).eval()
    lengths = torch.tensor([5, 2, 3])
    words = torch.randn(3, 5, 6)
    padded = words.clone()
    for row, length in enumerate(lengths):
        padded[row, length:] = 100.0  # garbage after the end must not matter
    with torch.no_grad():
        batched = encoder(padded, lengths)
        alone = torch.cat([encoder(words[row:row + 1, :length], lengths[row:row + 1])
                           for row, length in enumerate(lengths)])
    torch.testing.assert_close(batched, alone)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="at least one token"):
        encoder(words, torch.tensor([5, 0, 3]))


def test_sru_uses_the_original_v1_state_dict_layout():
    encoder = TextEncoder(word_dim=10, embed_dim=12, layers=4, dropout=0.25)
    expected = {}
    for layer in range(4):
        expected[f"rnn.rnn_lst.{layer}.weight"] = (10, 48) if layer == 0 else (12, 36)
        expected[f"rnn.rnn_lst.{layer}.weight_c"] = (24,)
        expected[f"rnn.rnn_lst.{layer}.bias"] = (24,)
        expected[f"rnn.rnn_lst.{layer}.scale_x"] = (1,)
    state = encoder.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # a state dict written in that layout loads strictly and changes the output
    torch.manual_seed(1)
    words, lengths = torch.randn(2, 4, 10), torch.tensor([4, 3])
    encoder.eval()
    with torch.no_grad():
        before = encoder(words, lengths)
        encoder.load_state_dict({k: torch.randn(v) for k, v in expected.items()}, strict=True)
        after = encoder(words, lengths)
    assert not torch.allclose(before, after)


def test_build_model_from_plain_dict_and_config_agree():
    config = ModelConfig(trunk="resnet18", maps_dim=8, embed_dim=8, word_dim=4, sru_layers=1)
    from_config = build_model(config)
    from_dict = build_model({**config.__dict__})
    assert from_config.state_dict().keys() == from_dict.state_dict().keys()
    assert from_dict.config == config


def test_forget_bias_initialises_the_forget_gates_and_lengthens_memory():
    torch.manual_seed(0)
    words = torch.randn(4, 12, 16)
    changed = words.clone()
    changed[:, 0] = torch.randn(4, 16)  # only the first word differs
    lengths = torch.full((4,), 12)
    effect = {}
    for bias in (0.0, 3.0):
        torch.manual_seed(1)
        encoder = TextEncoder(16, 32, layers=2, dropout=0.0, forget_bias=bias).eval()
        for layer in encoder.rnn.rnn_lst:
            assert torch.all(layer.bias[:32] == bias) and torch.all(layer.bias[32:] == 0)
        with torch.no_grad():
            effect[bias] = (encoder(words, lengths) - encoder(changed, lengths)).norm(dim=1).mean()
    assert effect[3.0] > 10 * effect[0.0]
