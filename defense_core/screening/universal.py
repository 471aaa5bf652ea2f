"""Universal shortcut per class: how far one small perturbation, shared by many
clean images, carries them into each class.

A backdoor is by construction a universal shortcut: one input change (the
trigger) sends images of every class to the target. For each class c we
optimize one perturbation ``delta_c`` (pixel space, L2 norm at most
``budget * sqrt(C * H * W)``, i.e. ``budget`` per pixel on average) that
minimizes the cross-entropy toward c over clean images of the other classes,
and measure the share of those images it sends to c (the flip rate). Natural
classes need large, image-specific changes; the target of a backdoor reaches a
high flip rate inside a budget its trigger fits in. The statistic is the robust
z-score of the largest flip rate against the other classes' (scale-free: no
logit or pixel scale enters). This is a one-budget, all-classes-at-once
relative of Neural Cleanse's per-class trigger search.

Adam on the perturbations, projected onto the L2 ball after every step; the
model in eval mode, its weights get no gradient, its mode is restored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from defense_core.imageset import ImageSet
from defense_core.progress import CancelHook, NullReporter, Reporter, check_cancel
from defense_core.screening.config import UniversalConfig
from defense_core.screening.stats import robust_z
from defense_core.spec import ModelSpec

FLIP_MAD_FLOOR = 0.02  # flip rates are shares; below 2 points of spread the z-score would be noise


@dataclass(frozen=True)
class UniversalResult:
    flip_rates: torch.Tensor   # [K] float64: share of other-class clean images sent to c by delta_c
    top_class: int
    robust_z: float            # of the largest flip rate against the other classes
    budget_l2: float
    steps: int


def flip_statistics(flip_rates: torch.Tensor, *, budget_l2: float = math.nan, steps: int = 0) -> UniversalResult:
    rates = flip_rates.detach().to(torch.float64).cpu()
    top = int(rates.argmax())
    others = torch.cat([rates[:top], rates[top + 1:]])
    median = float(others.median())
    mad = float((others - median).abs().median())
    z = robust_z(float(rates[top]), others) if mad * 1.4826 >= FLIP_MAD_FLOOR else \
        (float(rates[top]) - median) / FLIP_MAD_FLOOR
    return UniversalResult(flip_rates=rates, top_class=top, robust_z=z, budget_l2=budget_l2, steps=steps)


def _sources(clean: ImageSet, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every class c, the first ``n`` clean images whose label is not c (fewer if D is small)."""
    picks, owners = [], []
    for c in range(k):
        idx = torch.nonzero(clean.y != c).flatten()[:n]
        picks.append(idx)
        owners.append(torch.full((len(idx),), c, dtype=torch.long))
    return torch.cat(picks), torch.cat(owners)


def universal_flips(
    model: nn.Module,
    clean: ImageSet,
    spec: ModelSpec,
    config: UniversalConfig,
    *,
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
    step_offset: int = 0,
) -> UniversalResult:
    reporter = reporter or NullReporter()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    k = spec.num_classes
    index, owner = _sources(clean, k, config.images_per_class)
    if len(index) == 0:
        raise ValueError("the universal-shortcut signal needs clean images of at least two classes")
    x = (clean.x[index].to(device, torch.float32) / 255.0)
    owner = owner.to(device)
    shape = (spec.in_channels, *spec.input_size)
    radius = config.budget * math.sqrt(math.prod(shape))
    delta = torch.zeros((k, *shape), device=device, requires_grad=True)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    counts = torch.bincount(owner, minlength=k).clamp(min=1).float()
    was_training = model.training
    model.eval()
    try:
        for step in range(config.steps):
            check_cancel(cancel)
            logits = model(((x + delta[owner]).clamp(0.0, 1.0) - mean) / std)
            per_image = F.cross_entropy(logits.float(), owner, reduction="none")
            # the mean loss of each class's images, summed over classes: every delta gets its own objective
            loss = (torch.zeros(k, device=device).index_add(0, owner, per_image) / counts).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta.grad = grad
            optimizer.step()
            with torch.no_grad():
                norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
                delta.mul_((radius / norms).clamp(max=1.0).view(-1, 1, 1, 1))
            if step % 10 == 9 or step == config.steps - 1:
                reporter.update(stage="screening", step=step_offset + step + 1, total=None)
        with torch.no_grad():
            pred = model(((x + delta[owner]).clamp(0.0, 1.0) - mean) / std).argmax(1)
            hits = torch.zeros(k, device=device).index_add(0, owner, (pred == owner).float())
    finally:
        model.train(was_training)
    return flip_statistics((hits / counts).cpu(), budget_l2=radius, steps=config.steps)
