"""The in-memory dataset every stage works on: uint8 images, NCHW, plus labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defense_core.errors import DatasetError
from defense_core.spec import ModelSpec


@dataclass(frozen=True)
class ImageSet:
    """``x``: uint8 ``[N, C, H, W]``; ``y``: int64 ``[N]`` (true labels).

    ``target`` is set only for a poisoned test set: int64 ``[N]``, the attack's
    target label for each (triggered) image.
    """

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DatasetError(f"images must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.ndim != 1 or len(self.y) != len(self.x):
            raise DatasetError("labels must be int64 [N] with one label per image")
        if self.target is not None and (self.target.dtype != torch.int64 or self.target.shape != self.y.shape):
            raise DatasetError("target must be int64 [N] with one target per image")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(
            x=self.x[index],
            y=self.y[index],
            target=None if self.target is None else self.target[index],
        )

    def check_fits(self, spec: ModelSpec, *, what: str = "dataset") -> None:
        """Raise :class:`DatasetError` unless images and labels fit ``spec``."""
        c, h, w = self.image_shape
        if c != spec.in_channels or (h, w) != tuple(spec.input_size):
            raise DatasetError(
                f"{what}: images are {c}x{h}x{w} but the model expects "
                f"{spec.in_channels}x{spec.input_size[0]}x{spec.input_size[1]}"
            )
        if len(self) == 0:
            raise DatasetError(f"{what}: no images")
        lo, hi = int(self.y.min()), int(self.y.max())
        if lo < 0 or hi >= spec.num_classes:
            raise DatasetError(f"{what}: labels must be in [0, {spec.num_classes - 1}], found [{lo}, {hi}]")
        if self.target is not None:
            tlo, thi = int(self.target.min()), int(self.target.max())
            if tlo < 0 or thi >= spec.num_classes:
                raise DatasetError(
                    f"{what}: target labels must be in [0, {spec.num_classes - 1}], found [{tlo}, {thi}]")
