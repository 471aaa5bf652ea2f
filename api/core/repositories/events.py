"""Job events: the one place where a :class:`JobEvent` row is built."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select

from api.core.models import JobEvent, JobStatus
from api.core.repositories.base import Repository

MAX_PAGE_SIZE = 1000


def page_size(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be in [1, {MAX_PAGE_SIZE}], got {limit}")
    return limit


class JobEventRepository(Repository[JobEvent]):
    model = JobEvent

    def append(
        self,
        *,
        job_id: uuid.UUID,
        kind: str,
        status: str | None = None,
        stage: str | None = None,
        step: int | None = None,
        total: int | None = None,
        metrics: dict[str, Any] | None = None,
        message: str | None = None,
        created_at: datetime | None = None,
        flush: bool = True,
    ) -> JobEvent:
        """Add one event. ``created_at`` defaults to now; with ``flush`` (the default) its
        ``id`` is known on return, without it the row is written with the transaction."""
        event = JobEvent(
            job_id=job_id,
            kind=str(kind),
            status=str(status) if status is not None else None,
            stage=stage,
            step=step,
            total=total,
            metrics=metrics,
            message=message,
        )
        if created_at is not None:
            event.created_at = created_at
        return self.add(event, flush=flush)

    def list_after(self, *, job_id: uuid.UUID, after_id: int = 0,
                   limit: int = 100) -> list[JobEvent]:
        """Events of a job with ``id > after_id``, oldest first (``ix_job_events_job_id_id``)."""
        return self.get_all(
            self.base_statement()
            .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
            .order_by(JobEvent.id)
            .limit(page_size(limit))
        )

    def last_queued_at(self, *, job_id: uuid.UUID) -> datetime | None:
        """When the job was last (re-)queued: its newest ``queued`` status event."""
        return self.session.execute(
            select(JobEvent.created_at)
            .where(JobEvent.job_id == job_id, JobEvent.status == JobStatus.QUEUED.value)
            .order_by(JobEvent.id.desc())
            .limit(1)
        ).scalar_one_or_none()
