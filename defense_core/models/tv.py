"""torchvision classifiers (untrained, ``weights=None``) adapted to the spec.

The module names stay torchvision's, so checkpoints trained with torchvision
(``model.state_dict()``) load unchanged. Adaptations:

* ``in_channels != 3``: the first convolution is rebuilt with the same kernel,
  stride and padding for the requested channel count.
* VGG on inputs smaller than 32 pixels: five 2x2 poolings would shrink a side
  to zero, so the poolings round up (``ceil_mode``); for sides that are
  multiples of 32 this is the same network.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models as tvm

from defense_core.registry import register_model
from defense_core.spec import ModelSpec


def _rebuild_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _register_resnet(name: str, builder: Callable[..., tvm.ResNet]) -> None:
    @register_model(name)
    def factory(spec: ModelSpec) -> nn.Module:
        model = builder(weights=None, num_classes=spec.num_classes)
        model.conv1 = _rebuild_conv(model.conv1, spec.in_channels)
        return model


def _register_vgg(name: str, builder: Callable[..., tvm.VGG]) -> None:
    @register_model(name)
    def factory(spec: ModelSpec) -> nn.Module:
        model = builder(weights=None, num_classes=spec.num_classes)
        model.features[0] = _rebuild_conv(model.features[0], spec.in_channels)
        if min(spec.input_size) < 32:
            for layer in model.features:
                if isinstance(layer, nn.MaxPool2d):
                    layer.ceil_mode = True
        return model


def _register_mobilenet(name: str, builder: Callable[..., tvm.MobileNetV3]) -> None:
    @register_model(name)
    def factory(spec: ModelSpec) -> nn.Module:
        model = builder(weights=None, num_classes=spec.num_classes)
        stem = model.features[0]
        stem[0] = _rebuild_conv(stem[0], spec.in_channels)
        return model


_register_resnet("resnet18", tvm.resnet18)
_register_resnet("resnet34", tvm.resnet34)
_register_resnet("resnet50", tvm.resnet50)
_register_vgg("vgg11_bn", tvm.vgg11_bn)
_register_vgg("vgg16_bn", tvm.vgg16_bn)
_register_vgg("vgg19_bn", tvm.vgg19_bn)
_register_mobilenet("mobilenet_v3_small", tvm.mobilenet_v3_small)
_register_mobilenet("mobilenet_v3_large", tvm.mobilenet_v3_large)
