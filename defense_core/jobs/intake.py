"""The ``intake`` job kind: screen, then purify only a flagged model.

The request is a purification request (same inputs, same rules, and a model the
screening can read: three classes or more). The run is a purification that stops
after its screening on a clean verdict: with TSBD the screening reads the stage-1
unlearning the purification goes on with, so a flagged model is unlearned once; with
``ft`` the screening runs in full before fine-tuning. A clean model gets the decision
and its screening, and no file at ``out``; a flagged one the purify Result document
with the decision, and the purified model at ``out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from defense_core.errors import InputError
from defense_core.jobs import register_job_kind
from defense_core.jobs.params import PurifyConfig
from defense_core.jobs.purify import run_purify
from defense_core.jobs.request import ENGINE_NAMES, InputNames, LoadedPurify, PurifyRequest
from defense_core.jobs.screen import MIN_CLASSES, check_screenable
from defense_core.pipeline import ScreenedClean
from defense_core.progress import CancelHook, Reporter
from defense_core.screening import ScreeningReport


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
    try:
        document = run_purify(loaded, out=out, metadata=metadata, reporter=reporter, cancel=cancel,
                              stop_if_clean=True)
    except ScreenedClean as clean:
        return {"task": "intake", "decision": decision(clean.report, purified=False),
                "screening": clean.report.to_dict()}
    report = ScreeningReport(**document["screening"])
    return {"task": "intake", "decision": decision(report, purified=True), **document}
