"""Application services shared by the API and the worker.

``artifacts`` (uploads: stage, validate with the engine, store, record) and, for jobs:
``jobs`` (the request and its validation), ``lifecycle`` (every transition: create,
claim, heartbeat, progress, succeed, fail, release, cancel, reap), ``job_queries`` (reads),
``job_status`` (the status-polling hot path), ``job_errors`` (domain errors and a failed
job's error document), ``job_types`` (the values transitions take and return) and
``task_queue`` (enqueue and revoke through Celery). This module holds what they share:
turning the engine's :class:`~defense_core.errors.InputError` into a
:class:`~api.core.errors.DomainError` that keeps the engine's stable code.
"""

from __future__ import annotations

from typing import Any

from api.core.errors import InvalidInput, PayloadTooLarge
from defense_core.errors import InputError, TooLargeError


class RejectedInput(InvalidInput):
    """An input the engine (or a service check) refused, with a specific ``type`` slug.

    ``type`` and ``status`` are set per instance (e.g. ``unsafe-model`` / 422,
    ``label-out-of-range`` / 422) so clients can switch on the exact reason.
    """

    def __init__(
        self,
        detail: str,
        *,
        slug: str,
        status: int = 422,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, extra=extra)
        self.type = slug  # type: ignore[misc]  # per-instance override of the class slug
        self.status = status  # type: ignore[misc]


def from_input_error(exc: InputError, *, where: str | None = None) -> InvalidInput | PayloadTooLarge:
    """The domain error for an engine input error; ``where`` prefixes the message."""
    detail = f"{where}: {exc}" if where else str(exc)
    if isinstance(exc, TooLargeError) or exc.code == TooLargeError.code:
        return PayloadTooLarge(detail)
    return RejectedInput(detail, slug=exc.code)
