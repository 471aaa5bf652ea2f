"""The ``intake`` job kind: screen, then purify only a flagged model.

The request is a purification request (same inputs, same rules, and a model the
screening can read: three classes or more). The screening is the one a ``screen`` job
runs (its own short clean unlearning, the calibrated schedule), so the intake's verdict
is a screening job's verdict, and a clean model, the common case, costs a screening
and nothing more: TSBD's own stage 1 at its paper rate can run to its epoch cap on a
clean model, many times the screening's cost. A flagged model is then purified as a
``purify`` job would be, without screening it again: with TSBD that is a second, longer
unlearning (the screening's copy is not reused, its schedule is not the paper's). A
clean model gets the decision and its screening, and no file at ``out``; a flagged one
the purify Result document with the decision, and the purified model at ``out``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from defense_core.errors import InputError
from defense_core.jobs import register_job_kind
from defense_core.jobs.params import PurifyConfig
from defense_core.jobs.purify import run_purify
from defense_core.jobs.request import ENGINE_NAMES, InputNames, LoadedPurify, PurifyRequest
from defense_core.jobs.screen import MIN_CLASSES, check_screenable
from defense_core.progress import CancelHook, Reporter
from defense_core.screening import ScreeningReport, screen


class IntakeRequest(PurifyRequest):
    """A :class:`PurifyRequest` whose model must be screenable (three classes or more)."""

    def validate(self, *, names: InputNames = ENGINE_NAMES) -> PurifyConfig:
        config = super().validate(names=names)
        check_screenable(self.spec)
        return config


def decision(report: ScreeningReport, *, purified: bool) -> dict[str, Any]:
    """What the intake decided, and why, in one sentence."""
    flag = report.thresholds["suspicious"]
    if not purified:
        reason = f"verdict clean: score {report.score:.3f} is below the threshold {flag:.3f}, so it was not purified"
    else:
        reason = (f"verdict {report.verdict}: score {report.score:.3f} is at or above the threshold {flag:.3f} "
                  f"(suspected target {report.target}), so it was purified")
    return {"purified": purified, "reason": reason}


@register_job_kind("intake", request=IntakeRequest)
def run_intake(loaded: LoadedPurify, *, out: Path, metadata: Mapping[str, Any] | None = None,
               reporter: Reporter | None = None, cancel: CancelHook | None = None) -> dict[str, Any]:
    """Screen; purify (writing ``out``) only when the verdict is not clean."""
    if loaded.config.screening is None or loaded.spec.num_classes < MIN_CLASSES:
        raise InputError(f"an intake screens the model first: it needs at least {MIN_CLASSES} classes")
    report = screen(loaded.model, loaded.clean, loaded.spec, loaded.config.screening, progress=reporter,
                    should_stop=cancel)
    if not report.flagged:
        return {"task": "intake", "decision": decision(report, purified=False), "screening": report.to_dict()}
    unscreened = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, screening=None))
    document = run_purify(unscreened, out=out, metadata=metadata, reporter=reporter, cancel=cancel)
    document["screening"] = report.to_dict()
    return {"task": "intake", "decision": decision(report, purified=True), **document}
