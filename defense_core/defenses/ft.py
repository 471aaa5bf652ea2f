"""The fine-tuning baseline: stage 2 alone, vanilla fine-tuning (alpha = 0) on D."""

from __future__ import annotations

import dataclasses

from defense_core.defenses import register_defense
from defense_core.defenses.run import DefenseRun
from defense_core.result import PurificationResult


@register_defense("ft")
def ft(run: DefenseRun) -> PurificationResult:
    before = run.measure(stage="loading", step=2, total=2)
    run.screen()  # no stage 1 to reuse: the screening runs in full
    finetune = run.finetune(dataclasses.replace(run.config.aft, alpha=0.0))
    after = run.measure(stage="evaluating", step=1, total=1)
    return PurificationResult(
        defense="ft", before=before, after_stage1=before, after=after, timings_s=run.timings,
        unlearning=None, reinit=None, top_neurons=(), finetune=finetune,
        params=run.config.to_params(), state_dict=run.state_dict(),
        screening=run.screening_document(),
    )
