"""Jobs: tenant-scoped reads, keyset pages, row locks and conditional writes.

The state machine that decides *which* write to make is
:mod:`api.core.services.lifecycle`; this module only knows how to read and write
``jobs`` rows. Every read a client can reach takes ``org_id``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, or_, select

from api.core.errors import InvalidInput
from api.core.models import Job, JobEventKind, JobStatus
from api.core.repositories.base import Repository
from api.core.repositories.events import JobEventRepository, page_size


@dataclass(frozen=True)
class JobCursor:
    """Position in the newest-first job list: the last row seen ``(created_at, id)``.

    Opaque to clients: :meth:`encode` gives URL-safe text, :meth:`decode` validates it.
    """

    created_at: datetime
    id: uuid.UUID

    @classmethod
    def after(cls, job: Job) -> JobCursor:
        return cls(created_at=job.created_at, id=job.id)

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), str(self.id)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JobCursor:
        try:
            if len(text) > 200:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_at, job_id = json.loads(raw)
            cursor = cls(created_at=datetime.fromisoformat(created_at), id=uuid.UUID(job_id))
            if cursor.created_at.tzinfo is None:
                raise ValueError("naive timestamp")
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as error:
            raise InvalidInput(f"invalid cursor {text[:40]!r}") from error
        return cursor


def owned_by(job_id: uuid.UUID, worker: str) -> ColumnElement[bool]:
    """The job is running under ``worker``: the condition of every write after a claim."""
    return (Job.id == job_id) & (Job.status == JobStatus.RUNNING.value) & (Job.worker == worker)


class JobRepository(Repository[Job]):
    model = Job

    def create(
        self,
        *,
        org_id: uuid.UUID,
        defense: str,
        model_id: uuid.UUID,
        clean_dataset_id: uuid.UUID,
        params: dict[str, Any] | None = None,
        test_dataset_id: uuid.UUID | None = None,
        poisoned_dataset_id: uuid.UUID | None = None,
        trigger: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
        job_id: uuid.UUID | None = None,
        task: str = "purify",
    ) -> Job:
        """Add a queued job and its first ``status`` event (flushed, not committed).

        A second job with the same ``(org_id, idempotency_key)`` raises
        ``sqlalchemy.exc.IntegrityError`` at this flush; services look the key up first
        with :meth:`get_by_idempotency_key` and treat the error as a lost race.
        """
        job = Job(
            id=job_id or uuid.uuid4(),
            org_id=org_id,
            status=JobStatus.QUEUED.value,
            task=task,
            defense=defense,
            params=dict(params or {}),
            model_id=model_id,
            clean_dataset_id=clean_dataset_id,
            test_dataset_id=test_dataset_id,
            poisoned_dataset_id=poisoned_dataset_id,
            trigger=trigger,
            idempotency_key=idempotency_key,
            request_fingerprint=request_fingerprint,
            attempts=0,
            cancel_requested=False,
        )
        self.add(job, flush=True)
        JobEventRepository(self.session).append(
            job_id=job.id, kind=JobEventKind.STATUS, status=JobStatus.QUEUED
        )
        return job

    # -- reads of one organization ------------------------------------------------------------

    def get(self, *, org_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
        """The job if it exists AND belongs to ``org_id``."""
        return self.get_one_or_none(
            self.base_statement().where(Job.id == job_id, Job.org_id == org_id)
        )

    def get_by_idempotency_key(self, *, org_id: uuid.UUID, key: str) -> Job | None:
        return self.get_one_or_none(
            self.base_statement().where(Job.org_id == org_id, Job.idempotency_key == key)
        )

    def list(
        self,
        *,
        org_id: uuid.UUID,
        limit: int = 20,
        status: str | Sequence[str] | None = None,
        after: JobCursor | None = None,
    ) -> list[Job]:
        """The organization's jobs newest first (``created_at DESC, id DESC``), keyset-paginated.

        ``after`` is the cursor of the last job of the previous page; ``status`` filters on
        one status or several. Served by ``ix_jobs_org_id_created_at_id`` /
        ``ix_jobs_org_id_status_created_at``.
        """
        query = self.base_statement().where(Job.org_id == org_id)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            for value in statuses:
                JobStatus(value)  # ValueError on an unknown status: a caller bug
            query = query.where(Job.status.in_([str(value) for value in statuses]))
        if after is not None:
            query = query.where(
                or_(
                    Job.created_at < after.created_at,
                    and_(Job.created_at == after.created_at, Job.id < after.id),
                )
            )
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(page_size(limit))
        return self.get_all(query)

    # -- the state machine's reads and writes (any organization, by id) ---------------------

    def lock(self, job_id: uuid.UUID) -> Job | None:
        return self.get_by_id(job_id, for_update=True)

    def update_owned(self, *, job_id: uuid.UUID, worker: str, values: dict[str, Any]) -> bool:
        """Write ``values`` only while ``worker`` owns the running job."""
        return self.update_where(owned_by(job_id, worker), values=values) == 1

    def update_in_status(self, *, job_id: uuid.UUID, status: JobStatus,
                         values: dict[str, Any]) -> bool:
        """Write ``values`` only while the job is in ``status`` (atomic against a concurrent
        transition); the job object of the session is not refreshed."""
        return bool(self.update_where(Job.id == job_id, Job.status == status.value,
                                      values=values, synchronize_session=False))

    def set_task_id(self, *, job_id: uuid.UUID, task_id: str, only_if_unset: bool = False) -> None:
        criteria = [Job.id == job_id]
        if only_if_unset:
            criteria.append(Job.task_id.is_(None))
            self.update_where(*criteria, values={"task_id": task_id}, synchronize_session=False)
        else:
            self.update_where(*criteria, values={"task_id": task_id})

    def control(self, job_id: uuid.UUID) -> Row[Any] | None:
        """``(cancel_requested, status, worker)`` of the job: a primary-key read."""
        return self.session.execute(
            select(Job.cancel_requested, Job.status, Job.worker).where(Job.id == job_id)
        ).one_or_none()

    def cancel_flag(self, job_id: uuid.UUID) -> bool | None:
        return self.session.execute(
            select(Job.cancel_requested).where(Job.id == job_id)
        ).scalar_one_or_none()

    def owners(self, job_ids: Iterable[uuid.UUID]) -> list[Row[Any]]:
        """``(id, status, worker)`` of the given jobs that exist."""
        return list(self.session.execute(
            select(Job.id, Job.status, Job.worker).where(Job.id.in_(list(job_ids)))
        ))

    def lock_stale_running(self, *, before: datetime, limit: int) -> list[Job]:
        """Running jobs with no heartbeat since ``before``, oldest first, locked; rows another
        reaper holds are skipped."""
        return list(self.session.execute(
            self.base_statement()
            .where(Job.status == JobStatus.RUNNING.value)
            .where((Job.heartbeat_at < before)
                   | (Job.heartbeat_at.is_(None) & (Job.started_at < before)))
            .order_by(Job.heartbeat_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars().all())

    def queued_since_before(self, *, before: datetime, limit: int) -> list[Row[Any]]:
        """``(id, created_at)`` of jobs queued and created before ``before``, oldest first."""
        return list(self.session.execute(
            select(Job.id, Job.created_at)
            .where(Job.status == JobStatus.QUEUED.value, Job.created_at < before)
            .order_by(Job.created_at)
            .limit(limit)
        ))

    def count_in_status(self, status: JobStatus) -> int:
        return self.count(Job.status == status.value)

    def counts_by_status(self) -> dict[str, int]:
        return {str(status): count for status, count in self.count_by(Job.status)}
