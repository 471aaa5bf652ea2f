"""What a reader found, and what validating a dataset reports to the uploader."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from defense_core.imageset import ImageSet


@dataclass(frozen=True)
class DatasetInfo:
    """What validating a dataset file found (returned to the uploader)."""

    format: str
    num_samples: int
    image_shape: tuple[int, int, int]
    num_classes_seen: int
    label_min: int
    label_max: int
    classes: list[str] | None
    has_target: bool
    target_labels: list[int] | None
    # Poisoned sets: samples whose true label equals their target. They say nothing
    # about the attack and are left out of ASR/RA (which count non-target images only).
    target_class_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d


@dataclass(frozen=True)
class Read:
    """What a reader found; ``x`` is None when the images were validated, not kept."""

    format: str
    image_shape: tuple[int, int, int]
    y: torch.Tensor
    target: torch.Tensor | None
    classes: list[str] | None
    x: torch.Tensor | None

    def imageset(self) -> ImageSet:
        assert self.x is not None, "read with keep_images=False"
        return ImageSet(x=self.x, y=self.y, target=self.target)
