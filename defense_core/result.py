"""The outcome of a purification and its Result document (``GET /v1/jobs/{id}/result``,
``cleanroom purify --json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from defense_core.metrics import StageMetrics, der, fidelity
from defense_core.tsbd.aft import FinetuneResult
from defense_core.tsbd.nwc import NeuronScore
from defense_core.tsbd.reinit import ReinitResult
from defense_core.tsbd.unlearning import UnlearnResult


@dataclass(frozen=True)
class PurificationResult:
    defense: str
    before: StageMetrics
    after_stage1: StageMetrics
    after: StageMetrics
    timings_s: dict[str, float]
    unlearning: UnlearnResult | None
    reinit: ReinitResult | None
    top_neurons: tuple[NeuronScore, ...]
    finetune: FinetuneResult
    params: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    sweep: tuple[SweepPoint, ...] = ()  # one per n when neuron_ratio was swept
    # the ScreeningReport document of the model before purification; None when it was
    # not screened (screening off, or fewer than three classes)
    screening: dict[str, Any] | None = None

    @property
    def der(self) -> float | None:
        return der(self.before, self.after)

    @property
    def fidelity(self) -> float | None:
        return fidelity(self.before, self.after)

    def to_document(self, model_sha256: str) -> dict[str, Any]:
        """The Result document of the API and of ``cleanroom purify --json``."""
        unlearning = (
            self.unlearning.to_dict() if self.unlearning is not None
            else {"epochs": 0, "steps": 0, "final_clean_acc": 0.0}
        )
        reinit: dict[str, Any] = (
            self.reinit.to_dict() if self.reinit is not None
            else {"neuron_ratio": 0.0, "weight_ratio": 0.0, "neurons_zeroed": 0,
                  "weights_zeroed": 0}
        )
        if self.sweep:
            reinit["sweep"] = [p.to_dict() for p in self.sweep]
        return {
            "metrics": {
                "before": self.before.to_dict(),
                "after_stage1": self.after_stage1.to_dict(),
                "after": self.after.to_dict(),
            },
            "der": self.der,
            "fidelity": self.fidelity,
            "timings_s": dict(self.timings_s),
            "unlearning": unlearning,
            "reinit": reinit,
            "top_neurons": [n.to_dict() for n in self.top_neurons],
            "params": dict(self.params),
            "model_sha256": model_sha256,
            "screening": self.screening,
        }


@dataclass(frozen=True)
class SweepPoint:
    """One n of a sweep: the metrics after stage 1 and at the end, and the DER it scored."""

    neuron_ratio: float
    after_stage1: StageMetrics
    after: StageMetrics
    der: float | None
    chosen: bool

    def to_dict(self) -> dict[str, Any]:
        return {"neuron_ratio": self.neuron_ratio, "after_stage1": self.after_stage1.to_dict(),
                "after": self.after.to_dict(), "der": self.der, "chosen": self.chosen}
