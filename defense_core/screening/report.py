"""The ScreeningReport document (ARCHITECTURE.md, "Formats": a contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERDICTS = ("clean", "suspicious", "backdoored")


@dataclass(frozen=True)
class ScreeningReport:
    verdict: str                         # clean | suspicious | backdoored
    score: float                         # calibrated probability that the model is backdoored
    target: int | None                   # suspected target label; None for a clean verdict
    signals: dict[str, dict[str, Any]]   # name -> raw values and contribution to the logit
    per_class: list[dict[str, Any]]      # [{"class": c, ...evidence}]
    thresholds: dict[str, Any]           # values used and where they come from
    timings_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score!r}")

    @property
    def flagged(self) -> bool:
        return self.verdict != "clean"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "score": self.score,
            "target": self.target,
            "signals": self.signals,
            "per_class": self.per_class,
            "thresholds": self.thresholds,
            "timings_s": self.timings_s,
        }
