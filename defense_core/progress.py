"""Progress reporting and cancellation hooks shared by every stage.

Stages call ``reporter.update(stage=..., step=..., total=..., metrics=...)`` and
``check_cancel()`` between steps. The engine prints nothing itself: the CLI
plugs in a progress bar, the worker a reporter that writes job events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from defense_core.errors import Cancelled

# In the order a job reports them. A TSBD purification screens after its stage-1
# unlearning (the collapse signal reuses it), so "screening" follows "unlearning";
# a screening job reports "loading" and "screening" only, fine-tuning "screening" first.
STAGES = ("loading", "unlearning", "screening", "ranking", "reinitializing", "finetuning", "evaluating")


class Reporter(Protocol):
    def update(
        self,
        *,
        stage: str,
        step: int,
        total: int | None,
        metrics: Mapping[str, float] | None = None,
    ) -> None: ...


class NullReporter:
    """A reporter that ignores every update."""

    def update(self, *, stage: str, step: int, total: int | None, metrics=None) -> None:
        return None


CancelHook = Callable[[], bool]


def never_cancel() -> bool:
    return False


def check_cancel(hook: CancelHook | None) -> None:
    """Raise :class:`Cancelled` if the hook says so."""
    if hook is not None and hook():
        raise Cancelled("cancelled by the caller")
