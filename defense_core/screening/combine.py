"""From signals to a calibrated probability and a verdict.

The score is a logistic model on scale-free features (no logit or pixel scales):

* ``margin``: ``min(-log10 p, 12)``, p the MM-BD p-value of the largest class statistic;
* ``collapse``: the share of clean non-modal-class images sent to the modal class after unlearning;
* ``agreement``: where the collapse's modal class ranks among the classes' maximum margins,
  ``(K - 1 - rank) / (K - 1)``: 1 when it has the largest margin, 0 when the smallest.

Two fitted models: with a clean set (all three features) and data-free (margin
alone). Coefficients and thresholds are measurements: they were fitted on the
calibration half of the screening zoo by ``python -m bench.screening`` and are
recorded, with the held-out figures, in ``bench/results/screening.md``. Every
coefficient is constrained to be >= 0, so the score is monotone in each signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MARGIN_FEATURE_CAP = 12.0


@dataclass(frozen=True)
class LogisticModel:
    intercept: float
    margin: float
    collapse: float = 0.0
    agreement: float = 0.0

    def logit(self, *, margin: float, collapse: float = 0.0, agreement: float = 0.0) -> float:
        return self.intercept + self.margin * margin + self.collapse * collapse + self.agreement * agreement

    def to_dict(self) -> dict[str, float]:
        return {"intercept": self.intercept, "margin": self.margin, "collapse": self.collapse,
                "agreement": self.agreement}


@dataclass(frozen=True)
class Thresholds:
    suspicious: float   # score at or above: suspicious (the default flag)
    backdoored: float   # score at or above: backdoored
    provenance: dict[str, Any]

    def verdict(self, score: float) -> str:
        if score >= self.backdoored:
            return "backdoored"
        if score >= self.suspicious:
            return "suspicious"
        return "clean"

    def to_dict(self) -> dict[str, Any]:
        return {"suspicious": self.suspicious, "backdoored": self.backdoored, **self.provenance}


# --- measured constants: bench/results/screening.md (python -m bench.screening --report, 2026-12-04) ---
# Fitted on the calibration half of the screening zoo (24 MNIST models: 12 backdoored, 12 clean; small_cnn 1/3
# channels, torchvision resnet18). The margin feature's weight came out 0: on this zoo the largest MM-BD margin
# belongs to a natural class (digit 8) in clean models too, so it does not separate (AUROC 0.32-0.36).
_PROVENANCE = {"source": "bench/results/screening.md", "calibration": "bench.screening zoo, calibration half",
               "date": "2026-12-04", "calibration_models": {"backdoored": 12, "clean": 12}}
WITH_CLEAN = LogisticModel(intercept=-1.234130117710664, margin=4.482381980616411e-09, collapse=1.349938402878795,
                           agreement=0.8152722624651598)
DATA_FREE = LogisticModel(intercept=-6.891836938268318e-07, margin=4.547208464468854e-09)
THRESHOLDS_WITH_CLEAN = Thresholds(0.599042, 0.802418, {
    **_PROVENANCE, "calibration_clean_fpr": {"suspicious": 0.0, "backdoored": 0.0},
    "heldout_clean_fpr": {"suspicious": 0.0, "backdoored": 0.0}})
THRESHOLDS_DATA_FREE = Thresholds(0.500001, 0.731059, {
    **_PROVENANCE, "calibration_clean_fpr": {"suspicious": 0.0, "backdoored": 0.0},
    "heldout_clean_fpr": {"suspicious": 0.0, "backdoored": 0.0}})
# ---


def agreement_feature(margins: torch.Tensor, modal_class: int) -> float:
    """Rank of the collapse's modal class among the per-class maximum margins, scaled to [0, 1]."""
    k = margins.numel()
    rank = int((margins > margins[modal_class]).sum())
    return (k - 1 - rank) / (k - 1)


def margin_feature(pvalue: float) -> float:
    return min(-math.log10(max(pvalue, 1e-300)), MARGIN_FEATURE_CAP)


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
