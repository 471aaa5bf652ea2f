"""Architecture registry: every name builds, runs, and keeps its state-dict names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defense_core.errors import UnknownArchitectureError
from defense_core.registry import available_models, create_model
from defense_core.spec import ModelSpec

EXPECTED_NAMES = {
    "preact_resnet18",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11_bn",
    "vgg16_bn",
    "vgg19_bn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "small_cnn",
}


def _logits(arch: str, channels: int, side: int, num_classes: int = 10) -> torch.Tensor:
    spec = ModelSpec(arch=arch, num_classes=num_classes, in_channels=channels, input_size=(side, side))
    model = create_model(spec).eval()
    with torch.no_grad():
        return model(torch.rand(2, channels, side, side))


def test_registry_holds_the_contract_names() -> None:
    assert set(available_models()) >= EXPECTED_NAMES


# VGG builds a 100M-parameter classifier (about a second each), so vgg11_bn runs
# only at 1x28x28 below: every name still gets one forward pass.
@pytest.mark.parametrize("arch", sorted(EXPECTED_NAMES - {"vgg11_bn"}))
def test_every_architecture_maps_rgb_32_to_logits(arch: str) -> None:
    out = _logits(arch, 3, 32, num_classes=7)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


# One per adaptation path (own stem, ResNet conv1, VGG features.0 + ceil pooling,
# MobileNet features.0.0); the bigger siblings share the code and ran above.
@pytest.mark.parametrize("arch", ["preact_resnet18", "small_cnn", "resnet18", "vgg11_bn", "mobilenet_v3_small"])
def test_single_channel_28_input_gives_logits(arch: str) -> None:
    assert _logits(arch, 1, 28).shape == (2, 10)


@pytest.mark.parametrize("arch", ["preact_resnet18", "small_cnn", "resnet18", "mobilenet_v3_small"])
def test_smallest_allowed_input_works(arch: str) -> None:
    assert _logits(arch, 1, 8).shape == (2, 10)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        create_model(ModelSpec(arch="resnet1000", num_classes=10))
    assert "preact_resnet18" in str(info.value) and "small_cnn" in str(info.value)


def test_preact_resnet18_uses_backdoorbench_names_and_size() -> None:
    model = create_model(ModelSpec(arch="preact_resnet18", num_classes=10))
    keys = list(model.state_dict())
    # 1 stem conv + 8 blocks x (2 BN x 5 entries + 2 convs) + 3 projections + linear weight/bias.
    assert len(keys) == 1 + 8 * 12 + 3 + 2
    for key in (
        "conv1.weight",
        "layer1.0.bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.weight",
        "layer1.0.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.conv2.weight",
        "linear.weight",
        "linear.bias",
    ):
        assert key in keys
    assert not any(k.startswith("bn.") for k in keys)  # no BN before the classifier
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut in stage 1
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)
    # Hand count: convs 11,159,232 + BN affine 6,784 + linear 5,130.
    assert sum(p.numel() for p in model.parameters()) == 11_171_146


def test_preact_stem_is_3x3_stride_1_and_follows_in_channels() -> None:
    model = create_model(ModelSpec(arch="preact_resnet18", num_classes=10, in_channels=1, input_size=(28, 28)))
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    assert model.conv1.stride == (1, 1)


@pytest.mark.parametrize(
    ("arch", "first_conv"),
    [("resnet18", "conv1"), ("mobilenet_v3_small", "features.0.0")],
)
def test_torchvision_models_adapt_first_conv(arch: str, first_conv: str) -> None:
    spec = ModelSpec(arch=arch, num_classes=5, in_channels=1, input_size=(28, 28))
    conv = create_model(spec).get_submodule(first_conv)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 1


def test_torchvision_rgb_model_keeps_torchvision_keys() -> None:
    import torchvision

    ours = create_model(ModelSpec(arch="resnet18", num_classes=10))
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_small_cnn_has_batchnorm_and_several_convs() -> None:
    model = create_model(ModelSpec(arch="small_cnn", num_classes=10, in_channels=1, input_size=(28, 28)))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) >= 2 and len(bns) == len(convs)


def test_small_cnn_trains_one_step() -> None:
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="small_cnn", num_classes=3, in_channels=1, input_size=(16, 16)))
    x, y = torch.rand(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.conv1.weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, model.conv1.weight)
