"""Choosing the neuron ratio n from clean data alone.

Rule ("clean-accuracy level"): try n on an increasing grid; for each, zero
reinitialize a copy of the original model exactly as stage 1 would and measure
its accuracy on the clean set D. Take the smallest n whose accuracy on D falls
to ``level`` or below, where ``level`` sits ``level_share`` of the way from
chance (1/K) up to the original model's accuracy on D (default: halfway).

Why: TSBD removes the backdoor by resetting the neurons that unlearning moved
most and letting fine-tuning on D rebuild the function. A reset too small to
disturb the model on D leaves the network essentially intact (and with it the
backdoor, which the ranked neurons carry); once the reset measurably breaks
the clean function, the fine-tuning has to rebuild it from D alone, and D
carries no trigger. The level makes "measurably broken" explicit, and the
smallest such n keeps the clean-accuracy cost down. Needs only the ranking,
the model and D (a forward pass over D per grid point); no poisoned data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from defense_core.imageset import ImageSet
from defense_core.metrics import accuracy
from defense_core.spec import ModelSpec
from defense_core.transforms import Normalizer
from defense_core.tsbd.config import ReinitConfig
from defense_core.tsbd.nwc import NeuronRanking
from defense_core.tsbd.reinit import zero_reinit_

DEFAULT_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def ratio_from_curve(
    grid: Sequence[float],
    clean_accs: Sequence[float],
    *,
    base_acc: float,
    num_classes: int,
    level_share: float = 0.5,
) -> float:
    """The smallest ``grid[i]`` with ``clean_accs[i] <= level`` (the largest grid value if none).

    ``level = chance + level_share * (base_acc - chance)`` with ``chance = 1 / num_classes``.
    """
    if len(grid) == 0 or len(grid) != len(clean_accs):
        raise ValueError("grid and clean_accs must be non-empty and of equal length")
    if list(grid) != sorted(grid):
        raise ValueError("grid must be increasing")
    if not 0.0 <= level_share <= 1.0:
        raise ValueError(f"level_share must be in [0, 1], got {level_share}")
    chance = 1.0 / num_classes
    level = chance + level_share * max(0.0, base_acc - chance)
    for n, acc in zip(grid, clean_accs, strict=True):
        if acc <= level:
            return float(n)
    return float(grid[-1])


def choose_neuron_ratio(
    model: nn.Module,
    ranking: NeuronRanking,
    clean: ImageSet,
    *,
    spec: ModelSpec,
    weight_ratio: float = ReinitConfig.weight_ratio,
    grid: Sequence[float] = DEFAULT_GRID,
    level_share: float = 0.5,
    batch_size: int = 512,
) -> float:
    """Apply the clean-accuracy-level rule to ``model`` (the original weights, left untouched)."""
    # Evaluate where the model lives (CPU or GPU), and try each n on the model itself,
    # restoring the original weights afterwards: no model copy (which TorchScript
    # modules do not support anyway), one weight snapshot in all.
    device = next(iter(model.parameters()), torch.empty(0)).device
    normalizer = Normalizer(spec, device)
    original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    base = accuracy(model, clean.x, clean.y, normalizer=normalizer, batch_size=batch_size)
    level = 1.0 / spec.num_classes + level_share * max(0.0, base - 1.0 / spec.num_classes)
    accs = []
    try:
        for n in grid:
            zero_reinit_(model, ranking, ReinitConfig(neuron_ratio=n, weight_ratio=weight_ratio))
            accs.append(accuracy(model, clean.x, clean.y, normalizer=normalizer, batch_size=batch_size))
            model.load_state_dict(original)
            if accs[-1] <= level:
                break  # larger n cannot be chosen any more
    finally:
        model.load_state_dict(original)
    return ratio_from_curve(grid[: len(accs)], accs, base_acc=base, num_classes=spec.num_classes,
                            level_share=level_share)
