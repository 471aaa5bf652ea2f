"""Reads of jobs: by id (scoped to the caller's organization), pages, events, the result
and the purified model of a succeeded job, and the small reads the worker and the
reaper make. Nothing here changes a job; transitions are in
:mod:`api.core.services.lifecycle`, the status-polling read in
:mod:`api.core.services.job_status`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.core.errors import InvalidInput, NotFound
from api.core.models import Artifact, Job, JobEvent, JobStatus
from api.core.repositories import ArtifactRepository, JobCursor, JobEventRepository, JobRepository
from api.core.services import RejectedInput
from api.core.services import artifacts as artifact_service
from api.core.services.job_errors import InvalidCursor, JobNotSucceeded

MAX_PAGE = 100


def get(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The caller's job, or 404 (also for another organization's job)."""
    job = JobRepository(session).get(org_id=org_id, job_id=job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def _page_start(limit: int, cursor: str | None) -> JobCursor | None:
    """The position after which a page starts (None: the first page), or a 422."""
    if not 1 <= limit <= MAX_PAGE:
        raise RejectedInput(f"limit must be in [1, {MAX_PAGE}], got {limit}", slug="invalid-input")
    if cursor is None:
        return None
    try:
        return JobCursor.decode(cursor)
    except InvalidInput:
        raise InvalidCursor("the cursor is not one this API returned") from None


@dataclass(frozen=True)
class JobPage:
    items: list[Job]
    next_cursor: str | None


def list_jobs(
    *,
    session: Session,
    org_id: uuid.UUID,
    limit: int = 20,
    cursor: str | None = None,
    status: str | None = None,
) -> JobPage:
    """The caller's jobs, newest first, ``limit`` at a time (keyset pagination)."""
    after = _page_start(limit, cursor)
    # One row more than asked tells whether a next page exists.
    rows = JobRepository(session).list(org_id=org_id, limit=limit + 1, status=status, after=after)
    items = rows[:limit]
    more = len(rows) > limit
    return JobPage(items=items,
                   next_cursor=JobCursor.after(items[-1]).encode() if more else None)


@dataclass(frozen=True)
class ModelPage:
    items: list[Artifact]
    next_cursor: str | None


def list_models(*, session: Session, org_id: uuid.UUID, limit: int = 20, cursor: str | None = None,
                verdict: str | None = None) -> ModelPage:
    """The caller's uploaded models, newest first, optionally only those whose latest
    screening gave ``verdict`` (keyset pagination, like :func:`list_jobs`)."""
    after = _page_start(limit, cursor)
    rows = ArtifactRepository(session).list_models(
        org_id=org_id, verdict=verdict, limit=limit + 1,
        after=None if after is None else (after.created_at, after.id))
    items = list(rows[:limit])
    more = len(rows) > limit
    next_cursor = JobCursor(created_at=items[-1].created_at, id=items[-1].id).encode() if more else None
    return ModelPage(items=items, next_cursor=next_cursor)


def list_events(
    *,
    session: Session,
    org_id: uuid.UUID,
    job_id: uuid.UUID,
    after: int = 0,
    limit: int = 100,
) -> list[JobEvent]:
    """Events of the caller's job with ``id > after``, oldest first."""
    get(session=session, org_id=org_id, job_id=job_id)
    return JobEventRepository(session).list_after(job_id=job_id, after_id=after, limit=limit)


def result(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
    """The stored Result document of a succeeded job (409 otherwise)."""
    job = get(session=session, org_id=org_id, job_id=job_id)
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        raise JobNotSucceeded(
            f"job {job_id} is {job.status}; a result exists once it has succeeded",
            extra={"job_status": job.status},
        )
    return job.result


def purified_model(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> Artifact:
    """The purified model artifact of a succeeded job (409 before that)."""
    job = get(session=session, org_id=org_id, job_id=job_id)
    if job.status == JobStatus.SUCCEEDED and job.purified_model_id is None:
        raise NotFound(f"job {job_id} ({job.task}) produced no purified model: a screen job never "
                       "does, an intake job only for a model its screening flagged")
    if job.status != JobStatus.SUCCEEDED or job.purified_model_id is None:
        raise JobNotSucceeded(
            f"job {job_id} is {job.status}; the purified model exists once it has succeeded",
            extra={"job_status": job.status},
        )
    return artifact_service.get(session=session, org_id=org_id,
                                artifact_id=job.purified_model_id, what="purified model")


def counts_by_status(*, session: Session) -> dict[str, int]:
    """Number of jobs per status across all organizations (for /metrics)."""
    return JobRepository(session).counts_by_status()


def count_queued(*, session: Session) -> int:
    return JobRepository(session).count_in_status(JobStatus.QUEUED)


# -- what the running worker reads ---------------------------------------------------------


@dataclass(frozen=True)
class JobControl:
    """What the worker's cancel hook needs to know about its job."""

    cancel_requested: bool
    owned: bool


def job_control(*, session: Session, job_id: uuid.UUID, worker: str) -> JobControl:
    """A primary-key read: is cancel requested, and does ``worker`` still own the job?"""
    row = JobRepository(session).control(job_id)
    if row is None:
        return JobControl(cancel_requested=True, owned=False)
    owned = row.status == JobStatus.RUNNING.value and row.worker == worker
    return JobControl(cancel_requested=bool(row.cancel_requested), owned=owned)


def cancel_requested(*, session: Session, job_id: uuid.UUID) -> bool:
    value = JobRepository(session).cancel_flag(job_id)
    return bool(value) if value is not None else True
