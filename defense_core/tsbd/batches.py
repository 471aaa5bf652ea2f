"""Seeded, augmented, normalized training batches over an in-memory clean set."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from defense_core.device import DeviceRuntime
from defense_core.imageset import ImageSet
from defense_core.spec import ModelSpec
from defense_core.transforms import AugmentConfig, Normalizer, augment, batch_indices, noise_blend, steps_per_epoch


class TrainBatches:
    """The clean set kept as uint8 on the device; each epoch is a fresh seeded
    shuffle, each batch augmented (crop/flip, optionally noise blends, on uint8)
    and then normalized."""

    def __init__(
        self,
        clean: ImageSet,
        *,
        spec: ModelSpec,
        batch_size: int,
        augment_config: AugmentConfig,
        generator: torch.Generator,
        runtime: DeviceRuntime,
        noise_blend: float = 0.0,
    ) -> None:
        if len(clean) == 0:
            raise ValueError("the clean set is empty")
        self.x = clean.x.to(runtime.device)
        self.y = clean.y.to(runtime.device)
        self.batch_size = batch_size
        self.augment_config = augment_config
        self.generator = generator
        self.runtime = runtime
        self.normalizer = Normalizer(spec, runtime.device)
        self.noise_blend = noise_blend  # share of images blended with noise (fine-tuning only)

    def __len__(self) -> int:
        return steps_per_epoch(self.x.shape[0], self.batch_size)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in batch_indices(self.x.shape[0], self.batch_size, generator=self.generator):
            idx = idx.to(self.x.device)
            xb = augment(self.x[idx], self.augment_config, self.generator)
            if self.noise_blend > 0:
                xb = noise_blend(xb, self.noise_blend, self.generator)
            yield self.runtime.prepare_input(self.normalizer(xb)), self.y[idx]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in at least float32 (autocast logits may be bf16/fp16)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, labels)
