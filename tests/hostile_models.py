"""TorchScript models that do what an attacker's model would, for the containment tests.

Each takes ``[N, 1, 16, 16]`` images and returns ``[N, 4]`` logits (the tests' spec),
so only what it does besides that makes it hostile.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

SPEC = {"arch": "torchscript", "num_classes": 4, "in_channels": 1, "input_size": [16, 16],
        "mean": [0.5], "std": [0.25]}


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class FileWriter(_Head):
    """Writes (creates) ``path`` through ``aten::from_file`` in ``forward``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.path, shared=True, size=64, dtype=torch.uint8)
        mapped.fill_(65)
        return self.logits(x) + mapped[0].float() * 0  # used, so the write is not optimized away


class FileReader(_Head):
    """Copies the first bytes of ``path`` into a buffer that is saved with the model."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.register_buffer("loot", torch.zeros(8, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loot.copy_(torch.from_file(self.path, shared=False, size=8, dtype=torch.uint8))
        return self.logits(x)


class Looper(_Head):
    """Never returns on an input that is not all zeros (the loop stays in C++)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        while bool(y.abs().sum() > 0):
            y = y * 1.0
        return self.logits(x)


class Allocator(_Head):
    """Allocates 1 GiB in ``forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.ones(1 << 28)
        return self.logits(x) + big[0] * 0


class SetStateWriter(nn.Module):
    """Writes ``path`` from ``__setstate__``, which ``torch.jit.load`` runs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.weight = nn.Parameter(torch.randn(256, 4) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.path = state[1]
        self.training = state[2]
        mapped = torch.from_file(self.path, shared=True, size=64, dtype=torch.uint8)
        mapped.fill_(66)
        self.weight = state[0] + mapped[0].float() * 0


class Benign(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def scripted_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def save(module: nn.Module, path: Path) -> Path:
    path.write_bytes(scripted_bytes(module))
    return path
