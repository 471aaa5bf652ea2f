"""Clean-unlearning collapse: where clean images go once clean accuracy is unlearned.

Gradient ascent on the clean set (TSBD stage 1, until accuracy <= tau) erases
the clean features first; a backdoored model keeps its backdoor path and sends
clean images of every class to the target, a clean model spreads them or
prefers a class much less. Per class c: the share of clean images whose label
is not c that the unlearned model predicts as c. The statistic is that share
for the modal class (the class predicted most often).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import torch
from torch import nn

from defense_core.imageset import ImageSet
from defense_core.metrics import predict
from defense_core.progress import CancelHook, NullReporter, Reporter
from defense_core.screening.config import CollapseConfig
from defense_core.spec import ModelSpec
from defense_core.transforms import Normalizer
from defense_core.tsbd.unlearning import UnlearnResult, unlearn_


@dataclass(frozen=True)
class CollapseResult:
    shares: torch.Tensor     # [K] float64: share of clean non-c images predicted as c
    modal_class: int
    share: float             # shares[modal_class]
    unlearning: UnlearnResult | None  # None when the predictions were given


def collapse_shares(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> CollapseResult:
    """The collapse statistic from the unlearned model's predictions on the clean set."""
    pred = predictions.detach().flatten().long().cpu()
    y = labels.detach().flatten().long().cpu()
    if pred.shape != y.shape or pred.numel() == 0:
        raise ValueError("unlearned predictions must hold one label per clean image")
    if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
        raise ValueError(f"unlearned predictions must be labels in [0, {num_classes - 1}]")
    shares = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        outside = y != c
        total = int(outside.sum())
        shares[c] = float(((pred == c) & outside).sum()) / total if total else 0.0
    counts = torch.bincount(pred, minlength=num_classes)
    modal = int(counts.argmax())
    return CollapseResult(shares=shares, modal_class=modal, share=float(shares[modal]), unlearning=None)


def _copy(model: nn.Module) -> nn.Module:
    # same rule as the pipeline: a TorchScript module is copied through save/load
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(model)


class _AsScreening:
    """Reports the unlearning steps under the job stage "screening"."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def update(self, *, stage: str, step: int, total: int | None, metrics=None) -> None:
        self.reporter.update(stage="screening", step=step, total=total, metrics=metrics)


def unlearned_collapse(
    model: nn.Module,
    clean: ImageSet,
    spec: ModelSpec,
    config: CollapseConfig,
    *,
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
) -> CollapseResult:
    """Unlearn a copy of ``model`` on ``clean`` to tau and measure where the clean images go."""
    reporter = reporter or NullReporter()
    unlearned = _copy(model)
    result = unlearn_(
        unlearned, clean, spec=spec, config=config.unlearn, augment=config.augment,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        generator=torch.Generator().manual_seed(config.seed), reporter=_AsScreening(reporter), cancel=cancel,
    )
    predictions = predict(unlearned, clean.x, normalizer=Normalizer(spec, "cpu"), batch_size=config.eval_batch_size)
    found = collapse_shares(predictions, clean.y, spec.num_classes)
    return CollapseResult(shares=found.shares, modal_class=found.modal_class, share=found.share, unlearning=result)
