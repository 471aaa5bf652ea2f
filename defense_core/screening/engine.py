"""``screen()``: is this model backdoored, toward which label, how sure."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from defense_core.errors import InputError
from defense_core.imageset import ImageSet
from defense_core.progress import CancelHook, NullReporter, Reporter, check_cancel
from defense_core.screening.collapse import CollapseResult, collapse_shares, unlearned_collapse
from defense_core.screening.combine import (
    DATA_FREE,
    THRESHOLDS_DATA_FREE,
    THRESHOLDS_WITH_CLEAN,
    WITH_CLEAN,
    LogisticModel,
    Thresholds,
    agreement_feature,
    margin_feature,
    sigmoid,
)
from defense_core.screening.config import ScreeningConfig
from defense_core.screening.margin import MarginResult, max_margins
from defense_core.screening.report import ScreeningReport
from defense_core.spec import ModelSpec

log = logging.getLogger(__name__)


def combine(
    spec: ModelSpec,
    margin: MarginResult | None,
    collapse: CollapseResult | None,
    *,
    model: LogisticModel | None = None,
    thresholds: Thresholds | None = None,
) -> tuple[float, str, int | None, dict[str, dict[str, Any]], list[dict[str, Any]], Thresholds, LogisticModel]:
    """Score, verdict, target, signals and per-class evidence from the raw signal results."""
    if margin is None and collapse is None:
        raise ValueError("nothing to combine")
    model = model or (WITH_CLEAN if collapse is not None else DATA_FREE)
    thresholds = thresholds or (THRESHOLDS_WITH_CLEAN if collapse is not None else THRESHOLDS_DATA_FREE)
    k = spec.num_classes
    f_margin = margin_feature(margin.pvalue) if margin is not None else 0.0
    f_collapse = collapse.share if collapse is not None else 0.0
    agree = agreement_feature(margin.margins, collapse.modal_class) if margin is not None and collapse is not None \
        else 0.0
    z = model.logit(margin=f_margin, collapse=f_collapse, agreement=agree)
    score = sigmoid(z)
    verdict = thresholds.verdict(score)

    per_class: list[dict[str, Any]] = []
    evidence = torch.zeros(k, dtype=torch.float64)
    for c in range(k):
        row: dict[str, Any] = {"class": c}
        if margin is not None:
            row["max_margin"] = float(margin.margins[c])
            row["margin_pvalue"] = float(margin.class_pvalues[c])
            evidence[c] += model.margin * margin_feature(float(margin.class_pvalues[c]))
        if collapse is not None:
            row["collapse_share"] = float(collapse.shares[c])
            evidence[c] += model.collapse * float(collapse.shares[c])
        row["evidence"] = float(evidence[c])
        per_class.append(row)
    target = None if verdict == "clean" else int(evidence.argmax())

    signals: dict[str, dict[str, Any]] = {}
    if margin is not None:
        signals["max_margin"] = {
            "class": margin.top_class, "statistic": float(margin.margins[margin.top_class]),
            "pvalue": margin.pvalue, "robust_z": margin.robust_z, "null_gamma": margin.null.to_dict(),
            "steps": margin.steps, "feature": f_margin, "contribution": model.margin * f_margin,
        }
    else:
        signals["max_margin"] = {"skipped": True, "contribution": 0.0}
    if collapse is not None:
        entry: dict[str, Any] = {
            "class": collapse.modal_class, "share": collapse.share, "feature": f_collapse,
            "contribution": model.collapse * f_collapse,
            "source": "given" if collapse.unlearning is None else "computed",
        }
        if collapse.unlearning is not None:
            u = collapse.unlearning
            entry["unlearning"] = {"epochs": u.epochs, "steps": u.steps, "final_clean_acc": u.final_clean_acc,
                                   "threshold": u.threshold, "reached_stop_acc": u.reached_stop_acc}
        signals["unlearning_collapse"] = entry
        if margin is not None:
            signals["agreement"] = {"class": collapse.modal_class, "value": agree, "feature": agree,
                                    "contribution": model.agreement * agree}
    else:
        signals["unlearning_collapse"] = {
            "skipped": True, "reason": "no clean set: only the data-free signals ran", "contribution": 0.0}
    signals["intercept"] = {"contribution": model.intercept}
    return score, verdict, target, signals, per_class, thresholds, model


def screen(
    model: nn.Module,
    clean: ImageSet | None,
    spec: ModelSpec,
    config: ScreeningConfig = ScreeningConfig(),
    *,
    progress: Reporter | None = None,
    should_stop: CancelHook | None = None,
    unlearned_predictions: torch.Tensor | None = None,
) -> ScreeningReport:
    """Screen ``model`` (not modified). ``clean`` may be None: then only data-free signals run.

    ``unlearned_predictions``: the labels a TSBD stage-1 unlearned copy predicts
    on ``clean`` (one per image); given, the collapse signal reuses them instead
    of unlearning again. Raises :class:`InputError` on inputs that do not fit
    ``spec`` and :class:`~defense_core.errors.Cancelled` when ``should_stop()``
    answers True.
    """
    reporter = progress or NullReporter()
    if spec.num_classes < 3:
        raise InputError("screening needs at least three classes (the margin test compares a class with the rest)")
    if clean is not None:
        clean.check_fits(spec, what="clean set")
    if unlearned_predictions is not None and clean is None:
        raise InputError("unlearned_predictions need the clean set they were predicted on")
    started = time.monotonic()
    timings: dict[str, float] = {}
    use_collapse = config.use_collapse and clean is not None
    reporter.update(stage="screening", step=0, total=None)

    collapse: CollapseResult | None = None
    if use_collapse:
        t0 = time.monotonic()
        if unlearned_predictions is not None:
            collapse = collapse_shares(unlearned_predictions, clean.y, spec.num_classes)
        else:
            collapse = unlearned_collapse(model, clean, spec, config.collapse, reporter=reporter, cancel=should_stop)
        timings["unlearning_collapse"] = time.monotonic() - t0
    check_cancel(should_stop)

    margin: MarginResult | None = None
    if config.use_margin:
        t0 = time.monotonic()
        offset = collapse.unlearning.steps if collapse is not None and collapse.unlearning is not None else 0
        margin = max_margins(model, spec, config.margin, reporter=reporter, cancel=should_stop,
                             step_offset=offset, total_steps=None)
        timings["max_margin"] = time.monotonic() - t0

    score, verdict, target, signals, per_class, thresholds, fitted = combine(spec, margin, collapse)
    used = {**thresholds.to_dict(), "score_model": "with_clean" if collapse is not None else "data_free",
            "coefficients": fitted.to_dict()}
    timings["total"] = time.monotonic() - started
    reporter.update(stage="screening", step=1, total=1, metrics={"score": score})
    log.info("screened: %s (score %.3f, target %s) in %.1fs", verdict, score, target, timings["total"])
    return ScreeningReport(verdict=verdict, score=score, target=target, signals=signals, per_class=per_class,
                           thresholds=used, timings_s=timings)
