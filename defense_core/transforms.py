"""Normalization, train-time augmentation and batching over in-memory tensors.

Augmentation works on uint8 batches (so padding is black, as with
torchvision's RandomCrop on images) and is driven by an explicit
``torch.Generator``; normalization turns uint8 into float with the spec's
mean/std.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from defense_core.spec import ModelSpec


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4    # random crop of the original size after zero padding
    hflip: bool = False      # random horizontal flip (off by default: wrong for digits)

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")


NO_AUGMENT = AugmentConfig(crop_padding=0, hflip=False)


class Normalizer:
    """uint8 ``[N, C, H, W]`` -> float32 normalized with the spec's mean/std."""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu") -> None:
        c = spec.in_channels
        self.scale = (1.0 / (255.0 * torch.tensor(spec.std, dtype=torch.float32))).view(1, c, 1, 1).to(device)
        self.shift = (torch.tensor(spec.mean, dtype=torch.float32) / torch.tensor(spec.std)).view(1, c, 1, 1).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.scale.device, torch.float32) * self.scale - self.shift


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random crop (with zero padding) and optional flip of a uint8 batch; returns a new tensor."""
    n, c, h, w = x.shape
    if cfg.crop_padding > 0 and n > 0:
        p = cfg.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if cfg.hflip and n > 0:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


NOISE_BLEND_ALPHA = (0.1, 0.3)  # the blend weights of noise_blend, drawn uniformly per image


def noise_blend(x: torch.Tensor, share: float, generator: torch.Generator,
                alpha: tuple[float, float] = NOISE_BLEND_ALPHA) -> torch.Tensor:
    """Blend a random ``share`` of the uint8 images with fresh uniform noise,
    ``(1 - a) x + a noise`` with ``a`` uniform in ``alpha``; returns a new tensor.

    A fine-tuning augmentation against blended triggers: labels stay, so the
    model learns that an image-wide texture does not change the class.
    """
    n = x.shape[0]
    if share <= 0 or n == 0:
        return x.clone()
    pick = (torch.rand(n, generator=generator) < share).view(-1, 1, 1, 1)
    a = torch.empty(n).uniform_(alpha[0], alpha[1], generator=generator).view(-1, 1, 1, 1)
    # drawn on the CPU generator (the same images on every device), moved as int16
    noise = torch.randint(0, 256, tuple(x.shape), generator=generator, dtype=torch.int16)
    pick, a, noise = pick.to(x.device), a.to(x.device), noise.to(x.device).float()
    mixed = ((1.0 - a) * x.float() + a * noise).round_().clamp_(0, 255).to(torch.uint8)
    return torch.where(pick, mixed, x)


def batch_indices(
    n: int, batch_size: int, *, generator: torch.Generator | None = None, shuffle: bool = True
) -> Iterator[torch.Tensor]:
    """Index batches covering ``range(n)`` once (the last one may be short)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, -(-n // batch_size))
