"""Data-free maximum margin per class (MM-BD, Wang et al., 2023).

For every class c, a batch of random images is optimized to maximize
``logit_c - max_{j != c} logit_j``; the class statistic is the largest margin
reached in its batch. A backdoor target owns a shortcut that lets a small input
change win by far more than any natural class feature, so its statistic stands
out from the others. The null is a gamma distribution fitted to the statistics
of the other classes; the p-value of the largest statistic accounts for it
being the largest of K (order statistic).

Optimization (our choice, stated because the scale matters): the images live
in pixel space [0, 1] (uniform random start from a seeded generator), are
normalized with the spec's mean and std before the model, and are projected
back to [0, 1] after every step; Adam, lr 0.05 by default. The model is in eval
mode (BatchNorm running statistics), its weights get no gradients, and its
train/eval mode is restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from defense_core.progress import CancelHook, NullReporter, Reporter, check_cancel
from defense_core.screening.config import MarginConfig
from defense_core.screening.stats import GammaFit, fit_gamma, max_order_pvalue, robust_z
from defense_core.spec import ModelSpec


@dataclass(frozen=True)
class MarginResult:
    margins: torch.Tensor          # [K] float64: the largest margin reached per class
    top_class: int
    pvalue: float                  # of the largest statistic under the gamma null of the others
    robust_z: float                # of the largest statistic against the others
    class_pvalues: torch.Tensor    # [K]: each class's statistic against the null of the other classes
    null: GammaFit
    steps: int

    @property
    def log10_inv_pvalue(self) -> float:
        return -math.log10(max(self.pvalue, 1e-300))


def margin_of(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logit[c] - max_{j != c} logit[j]`` per row, for the row's class ``c``."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return own - others.max(1).values


def class_statistics(margins: torch.Tensor) -> MarginResult:
    """The MM-BD test on per-class statistics ``margins`` (K >= 3)."""
    m = margins.detach().to(torch.float64)
    k = m.numel()
    if k < 3:
        raise ValueError("the maximum-margin test needs at least three classes")
    top = int(m.argmax())
    pvalues = torch.empty(k, dtype=torch.float64)
    fits: dict[int, GammaFit] = {}
    for c in range(k):
        others = torch.cat([m[:c], m[c + 1:]])
        fits[c] = fit_gamma(others)
        pvalues[c] = max_order_pvalue(fits[c], float(m[c]), k)
    others = torch.cat([m[:top], m[top + 1:]])
    return MarginResult(margins=m, top_class=top, pvalue=float(pvalues[top]),
                        robust_z=robust_z(float(m[top]), others), class_pvalues=pvalues,
                        null=fits[top], steps=0)


def max_margins(
    model: nn.Module,
    spec: ModelSpec,
    config: MarginConfig,
    *,
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
    step_offset: int = 0,
    total_steps: int | None = None,
) -> MarginResult:
    """Optimize ``config.images_per_class`` inputs per class; return the per-class test."""
    reporter = reporter or NullReporter()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    k, n = spec.num_classes, config.images_per_class
    gen = torch.Generator().manual_seed(config.seed)
    shape = (k * n, spec.in_channels, *spec.input_size)
    pixels = torch.rand(shape, generator=gen).to(device).requires_grad_(True)
    classes = torch.arange(k, device=device).repeat_interleave(n)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    optimizer = torch.optim.Adam([pixels], lr=config.lr)
    best = torch.full((k * n,), float("-inf"), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for step in range(config.steps):
            check_cancel(cancel)
            logits = model((pixels - mean) / std)
            margin = margin_of(logits.float(), classes)
            best = torch.maximum(best, margin.detach().to(torch.float64))
            (grad,) = torch.autograd.grad(-margin.sum(), pixels)  # weights get no gradient
            pixels.grad = grad
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0.0, 1.0)
            if step % 10 == 9 or step == config.steps - 1:
                reporter.update(stage="screening", step=step_offset + step + 1, total=total_steps,
                                metrics={"margin_max": float(best.max())})
        with torch.no_grad():
            final = margin_of(model((pixels - mean) / std).float(), classes).to(torch.float64)
            best = torch.maximum(best, final)
    finally:
        model.train(was_training)
    per_class = best.view(k, n).max(1).values.cpu()
    result = class_statistics(per_class)
    return MarginResult(**{**result.__dict__, "steps": config.steps})
