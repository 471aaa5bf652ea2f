"""Tiny real models for the screening and job-kind tests: ``small_cnn`` on scikit-learn's
8x8 digits, one trained clean and one with a BadNets patch towards ``TARGET`` (seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defense_core.attacks import TriggerSpec
from defense_core.imageset import ImageSet
from defense_core.spec import ModelSpec
from defense_core.training import TrainConfig, poison_dataset, train_model
from defense_core.transforms import AugmentConfig

DIGITS_SPEC = ModelSpec(arch="small_cnn", num_classes=10, in_channels=1, input_size=(8, 8), mean=(0.3,), std=(0.4,))
TARGET = 3


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    """(training set of 1,400, clean set of 200)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * 255 / 16).round()).to(torch.uint8).view(-1, 1, 8, 8)
    y = torch.from_numpy(d.target).long()
    return ImageSet(x[:1400], y[:1400]), ImageSet(x[1400:1600], y[1400:1600])


@pytest.fixture(scope="module")
def tiny_models(digits: tuple[ImageSet, ImageSet]) -> dict[str, nn.Module]:
    torch.set_num_threads(1)
    train, _ = digits
    config = TrainConfig(epochs=8, lr=0.05, batch_size=64, augment=AugmentConfig(crop_padding=0))
    trigger = TriggerSpec.from_dict({"type": "badnets", "target": TARGET, "size": 2})
    poisoned = poison_dataset(train, trigger, ratio=0.1, seed=0)[0]
    return {"clean": train_model(DIGITS_SPEC, train, config=config, seed=1),
            "backdoored": train_model(DIGITS_SPEC, poisoned, config=config, seed=2)}
