"""Tiny models and data for the TSBD unit tests (any nn.Module with Conv2d works)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defense_core.imageset import ImageSet
from defense_core.spec import ModelSpec


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and are not slowed by a busy machine);
    import this fixture into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPEC = ModelSpec(arch="tiny", num_classes=4, in_channels=1, input_size=(8, 8), mean=(0.5,), std=(0.25,))


class TinyBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) + self.shortcut(x)


class TinyNet(nn.Module):
    """conv-BN-ReLU, a block with a projection shortcut, a `downsample` conv, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.block = TinyBlock(width, 2 * width)
        self.downsample = nn.Conv2d(2 * width, 2 * width, 1, stride=2, bias=False)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.downsample(self.block(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def quadrant_set(n: int, *, seed: int = 0, num_classes: int = 4) -> ImageSet:
    """8x8 grey images: class c has a bright 4x4 patch in quadrant c, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randint(0, 80, (n, 1, 8, 8), generator=g, dtype=torch.int64)
    for c in range(num_classes):
        r, col = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 160
    return ImageSet(x=x.clamp(0, 255).to(torch.uint8), y=y.to(torch.int64))


def trained_tiny(*, seed: int = 0, steps: int = 40) -> TinyNet:
    """A TinyNet fitted to the quadrant task (near 100% accuracy), deterministic."""
    from defense_core.transforms import Normalizer

    torch.manual_seed(seed)
    model = TinyNet()
    data = quadrant_set(256, seed=seed)
    x = Normalizer(SPEC)(data.x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), data.y).backward()
        opt.step()
    return model


def hand_built_pair() -> tuple[TinyNet, TinyNet]:
    """(original, unlearned) float64 TinyNets (width 2) with known weight changes.

    Ranked layers: ``conv1`` [2,1,3,3] and ``block.conv`` [4,2,3,3]. NWC:
    conv1 = [4.5, 3.5]; block.conv = [4.5, 0.0, 10.0, 3.5]. Shortcut and
    downsample convs change by 100 per weight and must be ignored.
    """
    original = TinyNet(width=2).double()
    with torch.no_grad():
        for i, p in enumerate(original.parameters()):
            p.copy_(torch.arange(1, p.numel() + 1, dtype=torch.float64).view_as(p) / 64 + i)
    import copy

    unlearned = copy.deepcopy(original)
    d_conv1 = torch.zeros(2, 9, dtype=torch.float64)
    d_conv1[0] = 0.5
    d_conv1[1] = torch.tensor([1, -0.5, 0.25, -0.25, 0.5, 0, 0, 0.5, -0.5], dtype=torch.float64)
    d_block = torch.zeros(4, 18, dtype=torch.float64)
    d_block[0, :9] = 0.5
    d_block[2, :5] = -2.0
    d_block[3, :7] = torch.tensor([0.5, -0.5] * 3 + [0.5], dtype=torch.float64)
    with torch.no_grad():
        unlearned.conv1.weight.add_(d_conv1.view(2, 1, 3, 3))
        unlearned.block.conv.weight.add_(d_block.view(4, 2, 3, 3))
        unlearned.block.shortcut[0].weight.add_(100.0)
        unlearned.downsample.weight.add_(100.0)
    return original, unlearned
