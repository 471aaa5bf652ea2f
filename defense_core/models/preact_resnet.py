"""Pre-activation ResNet-18 with the parameter names of the backdoor literature.

The state-dict keys match the PreActResNet18 used by BackdoorBench and the TSBD
reference code (``conv1``, ``layer{1..4}.{0,1}.{bn1,conv1,bn2,conv2}``,
``layer{2,3,4}.0.shortcut.0``, ``linear``), so their checkpoints load as-is.
That model has no batch norm after the last block: the output of ``layer4``
goes straight to global average pooling and the classifier. We keep that, so
the same weights give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defense_core.registry import register_model
from defense_core.spec import ModelSpec


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, plus the (projected) input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            # A Sequential so the 1x1 conv's key is ``shortcut.0.weight``.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + identity


class PreActResNet(nn.Module):
    """3x3 stride-1 stem (small inputs), four stages, adaptive pooling, linear head."""

    def __init__(self, blocks_per_stage: tuple[int, ...], *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        planes_in = 64
        stages = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage, strict=True)):
            first_stride = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(PreActBlock(planes_in, planes, first_stride if j == 0 else 1))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register_model("preact_resnet18")
def preact_resnet18(spec: ModelSpec) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), in_channels=spec.in_channels, num_classes=spec.num_classes)
