"""TSBD as a defense: stage 1 (clean unlearning, NWC ranking, zero reinitialization of
the top n) and stage 2 (activeness-aware fine-tuning), with n given, chosen from the
clean data (``"auto"``) or swept (the best DER on the test and poisoned data kept)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defense_core.defenses import register_defense
from defense_core.defenses.run import DefenseRun, copy_model
from defense_core.metrics import StageMetrics, der, predict
from defense_core.progress import Reporter, check_cancel
from defense_core.result import PurificationResult, SweepPoint
from defense_core.transforms import Normalizer
from defense_core.tsbd.choose_n import choose_neuron_ratio
from defense_core.tsbd.config import ReinitConfig
from defense_core.tsbd.nwc import NeuronRanking, rank_neurons
from defense_core.tsbd.reinit import ReinitResult, zero_reinit_
from defense_core.tsbd.unlearning import unlearn_

log = logging.getLogger(__name__)

TOP_NEURONS = 50


@register_defense("tsbd")
def tsbd(run: DefenseRun) -> PurificationResult:
    cfg = run.config
    before = run.measure(stage="loading", step=2, total=2)

    started = time.monotonic()
    unlearned = copy_model(run.model)
    unlearning = unlearn_(
        unlearned, run.clean, spec=run.spec, config=cfg.unlearn, augment=cfg.augment,
        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, generator=run.generator(0),
        runtime=run.runtime, reporter=run.reporter, cancel=run.cancel,
    )
    run.timings["unlearning"] = time.monotonic() - started
    if run.screens:
        # the screening's collapse signal reads this same unlearned model: no second unlearning
        run.screen(unlearned_predictions=_predictions(run, unlearned))

    check_cancel(run.cancel)
    started = time.monotonic()
    run.reporter.update(stage="ranking", step=0, total=1)
    ranking = rank_neurons(run.model, unlearned)
    del unlearned
    run.reporter.update(stage="ranking", step=1, total=1, metrics={"neurons": float(len(ranking))})
    run.timings["ranking"] = time.monotonic() - started

    check_cancel(run.cancel)
    params = cfg.to_params()
    params["stop_acc"] = unlearning.threshold
    common: dict[str, Any] = {"defense": "tsbd", "before": before, "unlearning": unlearning,
                              "top_neurons": tuple(ranking.top(TOP_NEURONS)), "params": params,
                              "screening": run.screening_document()}
    if cfg.sweep:
        return _sweep_n(run, ranking, before, common)
    reinit_config = cfg.reinit
    if reinit_config.neuron_ratio == "auto":
        # The clean-data rule: smallest n whose reset halves the accuracy on D above chance.
        started = time.monotonic()
        chosen = choose_neuron_ratio(run.model, ranking, run.clean, spec=run.spec,
                                     weight_ratio=reinit_config.weight_ratio,
                                     batch_size=cfg.eval_batch_size)
        run.timings["reinitializing"] += time.monotonic() - started
        reinit_config = dataclasses.replace(reinit_config, neuron_ratio=chosen)
    reinit, after_stage1 = _reinit(run, ranking, reinit_config)
    finetune = run.finetune(cfg.aft)
    after = run.measure(stage="evaluating", step=1, total=1)
    return PurificationResult(after_stage1=after_stage1, after=after, timings_s=run.timings,
                              reinit=reinit, finetune=finetune, state_dict=run.state_dict(),
                              **common)


def _predictions(run: DefenseRun, unlearned: nn.Module) -> torch.Tensor:
    """The unlearned model's labels for the clean images (full precision, on the CPU)."""
    device = run.runtime.device
    return predict(unlearned, run.clean.x.to(device), normalizer=Normalizer(run.spec, device),
                   batch_size=run.config.eval_batch_size, runtime=run.runtime.for_evaluation()).cpu()


def _reinit(run: DefenseRun, ranking: NeuronRanking,
            config: ReinitConfig) -> tuple[ReinitResult, StageMetrics]:
    """Zero-reinitialize ``run.model`` (the original weights) and measure it."""
    started = time.monotonic()
    reinit = zero_reinit_(run.model, ranking, config)
    run.timings["reinitializing"] += time.monotonic() - started
    run.reporter.update(stage="reinitializing", step=1, total=2, metrics={
        "neurons_zeroed": float(reinit.neurons_zeroed),
        "weights_zeroed": float(reinit.weights_zeroed)})
    return reinit, run.measure(stage="reinitializing", step=2, total=2)


@dataclass
class _SweepReporter:
    """Tags every update of one sweep point with its n and position."""

    inner: Reporter
    tags: dict[str, float]

    def update(self, *, stage: str, step: int, total: int | None,
               metrics: Mapping[str, float] | None = None) -> None:
        self.inner.update(stage=stage, step=step, total=total,
                          metrics={**(metrics or {}), **self.tags})


def _sweep_n(run: DefenseRun, ranking: NeuronRanking, before: StageMetrics,
             common: dict[str, Any]) -> PurificationResult:
    """The paper's way of choosing n: run stage 1 and stage 2 from the original
    weights for every n of the sweep, measure each on the test and poisoned data,
    keep the model with the highest DER (the smaller n on a tie)."""
    cfg = run.config
    assert cfg.sweep is not None
    original = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    reporter = run.reporter
    points: list[SweepPoint] = []
    best: dict[str, Any] | None = None
    try:
        for i, n in enumerate(cfg.sweep):
            if i:
                run.model.load_state_dict(original)
            run.reporter = _SweepReporter(reporter, {"sweep_n": n, "sweep_point": float(i + 1),
                                                     "sweep_points": float(len(cfg.sweep))})
            reinit_config = dataclasses.replace(cfg.reinit, neuron_ratio=n)
            reinit, after_stage1 = _reinit(run, ranking, reinit_config)
            finetune = run.finetune(cfg.aft)
            after = run.measure(stage="evaluating", step=1, total=1)
            score = der(before, after)
            points.append(SweepPoint(n, after_stage1, after, score, chosen=False))
            log.info("sweep n=%g: %s -> %s (DER %s)", n, before.to_dict(), after.to_dict(), score)
            if best is None or (score is not None and score > best["score"]):
                best = {"score": score, "index": i, "reinit": reinit, "after_stage1": after_stage1,
                        "after": after, "finetune": finetune, "state_dict": run.state_dict()}
    finally:
        run.reporter = reporter
    assert best is not None
    points[best["index"]] = dataclasses.replace(points[best["index"]], chosen=True)
    return PurificationResult(after_stage1=best["after_stage1"], after=best["after"],
                              timings_s=run.timings, reinit=best["reinit"],
                              finetune=best["finetune"], state_dict=best["state_dict"],
                              sweep=tuple(points), **common)
