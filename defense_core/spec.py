"""The model spec: which architecture, how many classes, what input it expects."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from defense_core.errors import InputError

MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 1024

# ``arch`` values for files that carry their own architecture (and code).
TORCH_EXPORT_ARCH = "torch_export"   # a torch.export.save archive (.pt2): the format for custom architectures
TORCHSCRIPT_ARCH = "torchscript"     # a TorchScript archive: deprecated, still accepted
CODE_ARCHS = frozenset({TORCH_EXPORT_ARCH, TORCHSCRIPT_ARCH})


@dataclass(frozen=True)
class ModelSpec:
    """``{"arch", "num_classes", "in_channels", "input_size", "mean", "std"}``.

    ``arch`` is a registry name (``preact_resnet18``, ``small_cnn``, ...) or
    one of ``CODE_ARCHS`` for a file that carries its own architecture:
    ``"torch_export"`` (a ``torch.export.save`` archive) or ``"torchscript"``
    (deprecated).
    ``mean``/``std`` are per channel, in [0, 1] units (images are scaled to
    [0, 1] before normalization).
    """

    arch: str
    num_classes: int
    in_channels: int = 3
    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise InputError("spec.arch must be a non-empty string")
        if not isinstance(self.num_classes, int) or not 2 <= self.num_classes <= MAX_CLASSES:
            raise InputError(f"spec.num_classes must be an integer in [2, {MAX_CLASSES}], got {self.num_classes!r}")
        if self.in_channels not in (1, 3):
            raise InputError(f"spec.in_channels must be 1 or 3, got {self.in_channels!r}")
        size = tuple(self.input_size)
        if len(size) != 2 or not all(isinstance(s, int) and 8 <= s <= MAX_INPUT_SIDE for s in size):
            raise InputError(
                f"spec.input_size must be [height, width] with sides in [8, {MAX_INPUT_SIDE}], got {self.input_size!r}"
            )
        object.__setattr__(self, "input_size", size)
        mean = tuple(float(m) for m in self.mean) if self.mean else (0.0,) * self.in_channels
        std = tuple(float(s) for s in self.std) if self.std else (1.0,) * self.in_channels
        if len(mean) != self.in_channels or len(std) != self.in_channels:
            raise InputError(f"spec.mean and spec.std need one value per channel ({self.in_channels})")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise InputError("spec.mean must be finite and spec.std finite and positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(data, Mapping):
            raise InputError("the model spec must be a JSON object")
        known = {"arch", "num_classes", "in_channels", "input_size", "mean", "std"}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown model spec fields: {sorted(unknown)}; known: {sorted(known)}")
        missing = {"arch", "num_classes"} - set(data)
        if missing:
            raise InputError(f"the model spec is missing: {sorted(missing)}")
        try:
            return cls(
                arch=data["arch"],
                num_classes=data["num_classes"],
                in_channels=data.get("in_channels", 3),
                input_size=tuple(data.get("input_size", (32, 32))),
                mean=tuple(data.get("mean", ())),
                std=tuple(data.get("std", ())),
            )
        except TypeError as exc:
            raise InputError(f"malformed model spec: {exc}") from exc

    @property
    def carries_code(self) -> bool:
        """The model file holds the architecture as code (checked by :mod:`defense_core.opcheck`)."""
        return self.arch in CODE_ARCHS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d
