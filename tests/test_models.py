"""The network parts against direct definitions of the paper's equations."""
from __future__ import annotations

import pytest
import torch
import torchvision

from misc.errors import UserError
from models.config import ModelConfig
from models.joint import build_model
from models.text import TextEncoder
from models.trunks import imagenet_file
from models.visual import ImageEncoder
from models.weldon import build_pooling, weldon_pool


def weldon_by_sorting(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 2 written directly: sort every map's activations, average the k largest and the k smallest."""
    ordered = maps.flatten(2).sort(dim=-1).values
    return ordered[..., -k:].mean(-1) + ordered[..., :k].mean(-1)


@pytest.mark.parametrize("k", [1, 3, 15, 0.25])  # counts, and a fraction of the 24 positions
def test_weldon_matches_direct_definition_values_and_gradients(k):
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


def test_unknown_trunk_is_rejected_with_a_suggestion():
    with pytest.raises(UserError, match=r"model.trunk = 'resnet125': unknown \(did you mean resnet152\?\)"):
        ImageEncoder("resnet125", 8, 8, "weldon", 1, 0.0)
    with pytest.raises(UserError, match="model.trunk = 'vit_b_16': unknown"):  # no feature grid to cut
        ImageEncoder("vit_b_16", 8, 8, "weldon", 1, 0.0)


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


def test_sru_input_dropout_acts_in_training_mode_only():
    torch.manual_seed(0)
    words, lengths = torch.randn(8, 6, 10), torch.full((8,), 6)
    encoder = TextEncoder(word_dim=10, embed_dim=12, layers=1, dropout=0.0, rnn_dropout=0.25)
    assert encoder.rnn.rnn_lst[0].rnn_dropout == 0.25
    with torch.no_grad():
        encoder.train()
        assert not torch.allclose(encoder(words, lengths), encoder(words, lengths))  # a new mask every call
        encoder.eval()
        torch.testing.assert_close(encoder(words, lengths), encoder(words, lengths), rtol=0, atol=0)
        plain = TextEncoder(word_dim=10, embed_dim=12, layers=1, dropout=0.0, rnn_dropout=0.0).train()
        torch.testing.assert_close(plain(words, lengths), plain(words, lengths), rtol=0, atol=0)


def test_importing_the_text_path_builds_and_reads_nothing():
    import subprocess
    import sys

    from tests.conftest import ROOT
    check = "import sys, models.text; assert 'sru' not in sys.modules, 'sru imported'"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def resnet18_file(path, **drop: bool):
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    if drop.get("counters"):
        state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    torch.save(state, path)
    return state


def test_trunk_starts_from_a_torchvision_state_dict_only_when_asked(tmp_path):
    path = tmp_path / "resnet18.pth"
    state = resnet18_file(path, counters=True)  # torchvision's own files predate the batch-norm counters
    config = ModelConfig(trunk="resnet18", maps_dim=8, embed_dim=8, word_dim=4, sru_layers=1,
                         trunk_init=f"file:{path}")
    loaded = build_model(config, init_trunk=True)
    torch.testing.assert_close(loaded.image.trunk.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    torch.testing.assert_close(loaded.image.trunk.bn1.running_var, state["bn1.running_var"])
    path.unlink()  # rebuilding a saved model (no init_trunk) never reads the source
    assert not torch.equal(build_model(config).image.trunk.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("trunk, change, message", [
    ("resnet34", None, "(the resnet34 trunk) does not fit: 80 trunk keys missing (layer1.2.bn1.bias"),
    ("resnet18", {"head.weight": torch.zeros(1)}, "0 trunk keys missing, 1 unexpected (head.weight)"),
    ("resnet18", {"conv1.weight": torch.zeros(32, 3, 7, 7)}, "conv1.weight is (32, 3, 7, 7) in the file but "
                                                             "(64, 3, 7, 7) in the trunk"),
])
def test_a_state_dict_that_does_not_fit_the_trunk_is_one_line(tmp_path, trunk, change, message):
    path = tmp_path / "resnet18.pth"
    torch.save({**resnet18_file(path), **(change or {})}, path)
    config = ModelConfig(trunk=trunk, maps_dim=8, embed_dim=8, word_dim=4, sru_layers=1, trunk_init=f"file:{path}")
    with pytest.raises(UserError) as error:
        build_model(config, init_trunk=True)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_imagenet_weights_come_from_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="torchvision has no IMAGENET1K_V2 weights for resnet18; it has "
                                          "IMAGENET1K_V1"):
        imagenet_file("resnet18", "IMAGENET1K_V2")
    with pytest.raises(UserError, match="not in torch hub's cache"):
        imagenet_file("resnet18", "IMAGENET1K_V1")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    state = resnet18_file(cached)
    model = build_model(ModelConfig(trunk="resnet18", maps_dim=8, embed_dim=8, word_dim=4, sru_layers=1,
                                    trunk_init="IMAGENET1K_V1"), init_trunk=True)
    torch.testing.assert_close(model.image.trunk.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
