"""The values job transitions take and return: a claim's outcome, the purified model a
worker stored, the reaper's policy and report (see :mod:`api.core.services.lifecycle`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # the caller now runs the job
    MISSING = "missing"  # no such job (deleted): nothing to do
    TERMINAL = "terminal"  # already succeeded/failed/cancelled: nothing to do
    CANCELLED = "cancelled"  # cancel was requested before it started: now cancelled
    BUSY = "busy"  # running under another live worker: leave it alone
    EXHAUSTED = "exhausted"  # delivered too often after lost workers: now failed


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempt: int = 0


@dataclass(frozen=True)
class PurifiedModel:
    """What the worker stored for the purified model (becomes an Artifact row)."""

    artifact_id: uuid.UUID
    storage_key: str
    size: int
    sha256: str
    filename: str = "purified.safetensors"
    format: str = "safetensors"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size < 0 or len(self.sha256) != 64:
            raise ValueError("a purified model needs a size >= 0 and a sha256 hex digest")


@dataclass(frozen=True)
class ReapPolicy:
    stale_after_s: float  # running with no heartbeat for this long: its worker is lost
    queued_after_s: float  # queued for this long (since creation or last re-enqueue): send again
    max_attempts: int
    time_limit_s: float | None = None  # a lost job that started longer ago than this timed out
    batch: int = 100

    def __post_init__(self) -> None:
        if self.stale_after_s <= 0 or self.queued_after_s <= 0 or self.max_attempts < 1:
            raise ValueError("reap policy: thresholds must be > 0 and max_attempts >= 1")


@dataclass(frozen=True)
class ReapReport:
    requeued: list[uuid.UUID]  # stale running → queued (enqueue them after commit)
    failed: list[uuid.UUID]  # stale running, out of attempts → failed "worker lost"
    cancelled: list[uuid.UUID]  # stale running with cancel requested → cancelled
    resend: list[uuid.UUID]  # queued too long → enqueue again after commit

    @property
    def to_enqueue(self) -> list[uuid.UUID]:
        return [*self.requeued, *self.resend]
