"""Screening: a verdict (clean / suspicious / backdoored), a calibrated score and a
suspected target label, from clean data alone (or no data at all).

Signals: the clean-unlearning collapse (:mod:`.collapse`, TSBD stage 1 reused)
and the data-free maximum margin per class (:mod:`.margin`, MM-BD); combined by
a logistic model fitted on the screening zoo (:mod:`.combine`).
"""

from defense_core.screening.collapse import CollapseResult, collapse_shares, unlearned_collapse
from defense_core.screening.combine import LogisticModel, Thresholds
from defense_core.screening.config import CollapseConfig, MarginConfig, ScreeningConfig
from defense_core.screening.engine import combine, screen
from defense_core.screening.margin import MarginResult, class_statistics, margin_of, max_margins
from defense_core.screening.report import VERDICTS, ScreeningReport

__all__ = [
    "VERDICTS", "CollapseConfig", "CollapseResult", "LogisticModel", "MarginConfig", "MarginResult",
    "ScreeningConfig", "ScreeningReport", "Thresholds", "class_statistics", "collapse_shares", "combine",
    "margin_of", "max_margins", "screen", "unlearned_collapse",
]
