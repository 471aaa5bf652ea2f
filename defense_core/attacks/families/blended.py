"""Blended (Chen et al., 2017): alpha-blend every image with one fixed pattern.

The pattern is either an image the client gives (``pattern``: uint8 values as
nested lists, ``[H][W]`` or ``[H][W][C]`` with C = 1 or 3, resized to the images
like the literature resizes its Hello Kitty photo) or, by default, uniform noise
drawn from a seeded generator: the same seed and image shape give the same
pattern on every machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from defense_core.attacks.base import check_number, register_trigger
from defense_core.errors import InputError

MAX_PATTERN_SIDE = 64  # the pattern travels in job documents; larger images are resized anyway
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, for a colour pattern on grayscale images

Pattern = tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class BlendedParams:
    alpha: float = 0.2          # weight of the pattern
    seed: int = 0               # seed of the noise pattern (when no pattern image is given)
    pattern: Pattern | None = None  # uint8 image [H][W] or [H][W][C]; None: seeded noise

    array_fields: ClassVar[frozenset[str]] = frozenset({"pattern"})

    def __post_init__(self) -> None:
        check_number("blended.alpha", self.alpha, 0.0, 1.0)
        check_number("blended.seed", self.seed, 0, 2**63 - 1, integer=True)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "seed", int(self.seed))
        if self.pattern is not None:
            object.__setattr__(self, "pattern", _checked_pattern(self.pattern))


def _checked_pattern(rows: Any) -> Pattern:
    """The pattern as nested tuples of ints, or :class:`InputError` saying what is wrong."""
    where = "blended.pattern"
    if not isinstance(rows, (list, tuple)) or not 1 <= len(rows) <= MAX_PATTERN_SIDE:
        raise InputError(f"{where} must be a list of 1 to {MAX_PATTERN_SIDE} rows ([H][W] or [H][W][C] uint8 values)")
    width = depth = None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not 1 <= len(row) <= MAX_PATTERN_SIDE:
            raise InputError(f"{where}[{i}] must be a list of 1 to {MAX_PATTERN_SIDE} pixels")
        if width is None:
            width = len(row)
            depth = len(row[0]) if isinstance(row[0], (list, tuple)) else 0
            if depth not in (0, 1, 3):
                raise InputError(f"{where}: pixels must be single values or lists of 1 or 3 channels, got {depth}")
        if len(row) != width:
            raise InputError(f"{where}: row {i} has {len(row)} pixels, row 0 has {width}")
        pixels = []
        for j, pixel in enumerate(row):
            values = pixel if depth else (pixel,)
            if depth and (not isinstance(pixel, (list, tuple)) or len(pixel) != depth):
                raise InputError(f"{where}[{i}][{j}] must be a list of {depth} channel values")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
                    raise InputError(f"{where}[{i}][{j}]: values must be integers in [0, 255], got {v!r}")
            pixels.append(tuple(pixel) if depth else pixel)
        out.append(tuple(pixels))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _image_pattern(pattern: Pattern, shape: tuple[int, int, int]) -> torch.Tensor:
    channels, height, width = shape
    img = torch.tensor(pattern, dtype=torch.float32)
    img = img.unsqueeze(-1) if img.ndim == 2 else img  # [H, W, C]
    if img.shape[-1] == 3 and channels == 1:
        img = img @ torch.tensor(LUMA).unsqueeze(1)
    elif img.shape[-1] == 1 and channels != 1:
        img = img.expand(-1, -1, channels)
    elif img.shape[-1] != channels:
        raise InputError(f"blended.pattern has {img.shape[-1]} channels, the images have {channels}")
    img = img.permute(2, 0, 1).unsqueeze(0)
    if img.shape[-2:] != (height, width):
        img = F.interpolate(img, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return img[0].round().clamp(0, 255).to(torch.uint8)


def blend_pattern(params: BlendedParams, shape: tuple[int, int, int]) -> torch.Tensor:
    """The uint8 ``[C, H, W]`` pattern for images of ``shape``."""
    if params.pattern is not None:
        return _image_pattern(params.pattern, tuple(shape)).clone()
    gen = torch.Generator().manual_seed(params.seed)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


@register_trigger("blended", params=BlendedParams)
def blended(x: torch.Tensor, params: BlendedParams, *, generator: torch.Generator | None = None) -> torch.Tensor:
    pattern = blend_pattern(params, tuple(x.shape[1:])).to(x.device, torch.float32)
    mixed = (1.0 - params.alpha) * x.to(torch.float32) + params.alpha * pattern
    return mixed.round_().clamp_(0, 255).to(torch.uint8)
