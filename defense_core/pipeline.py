"""The purification entry point: evaluate, stage 1, evaluate, stage 2, evaluate.

:func:`purify` runs ``config.defense`` (looked up in :mod:`defense_core.defenses`) on a
copy of the model. The CLI and the contained child reach it through the ``purify`` job
kind (:mod:`defense_core.jobs.purify`), which validates and loads the inputs first; the
parameters are described in :mod:`defense_core.jobs.params`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from defense_core.defenses import get_defense
from defense_core.defenses.run import DefenseRun, copy_model
from defense_core.device import make_runtime
from defense_core.errors import DatasetError, InputError
from defense_core.imageset import ImageSet
from defense_core.jobs.params import PurifyConfig
from defense_core.jobs.request import check_sweep_inputs
from defense_core.progress import CancelHook, NullReporter, Reporter
from defense_core.result import PurificationResult
from defense_core.spec import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_CONFIG = PurifyConfig()


def _check_inputs(spec: ModelSpec, clean: ImageSet, test: ImageSet | None,
                  poisoned: ImageSet | None, config: PurifyConfig) -> None:
    check_sweep_inputs(config, has_test=test is not None, has_poisoned=poisoned is not None)
    clean.check_fits(spec, what="clean set")
    if test is not None:
        test.check_fits(spec, what="test set")
    if poisoned is not None:
        if poisoned.target is None:
            raise DatasetError("poisoned set: no target labels (the NPZ needs a 'target' array)")
        poisoned.check_fits(spec, what="poisoned set")


def purify(
    model: nn.Module,
    spec: ModelSpec,
    clean: ImageSet,
    *,
    test: ImageSet | None = None,
    poisoned: ImageSet | None = None,
    config: PurifyConfig = DEFAULT_CONFIG,
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
    device: torch.device | str | None = None,
) -> PurificationResult:
    """Purify a copy of ``model`` (the caller's model is not modified) with
    ``config.defense`` and measure it before, after stage 1 and at the end.

    Metrics need ``test`` (CA) and/or ``poisoned`` (ASR, RA); without them the
    values are None. Deterministic on CPU for a given ``config.seed``. Raises
    :class:`InputError` on inputs that do not fit ``spec`` and
    :class:`~defense_core.errors.Cancelled` when ``cancel()`` answers True.

    The model is screened on the way (``config.screening``; a TSBD run reuses its
    stage-1 unlearning) and the report is the result's ``screening``.
    """
    reporter = reporter or NullReporter()
    _check_inputs(spec, clean, test, poisoned, config)
    options = config.device
    if device is not None:
        options = dataclasses.replace(options, device=str(device))
    try:
        runtime = make_runtime(options, model=model,
                               input_shape=(spec.in_channels, *spec.input_size))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    started = time.monotonic()
    reporter.update(stage="loading", step=0, total=2)
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)  # layers that draw from the global stream (dropout)
        working = runtime.prepare_model(copy_model(model))
        reporter.update(stage="loading", step=1, total=2)
        run = DefenseRun(model=working, spec=spec, clean=clean, test=test, poisoned=poisoned,
                         config=config, runtime=runtime, reporter=reporter, cancel=cancel)
        result = get_defense(config.defense)(run)
    result.timings_s["total"] = time.monotonic() - started
    log.info("purified with %s in %.1fs: %s -> %s", config.defense, result.timings_s["total"],
             result.before.to_dict(), result.after.to_dict())
    return result
