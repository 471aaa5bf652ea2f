"""The repository layer: every query of the service and every job-event row goes through it.

One generic :class:`~api.core.repositories.base.Repository` (a model, a session, the
queries every table needs) and one repository per domain:

- ``accounts``: :class:`OrganizationRepository`, :class:`ApiKeyRepository`;
- ``artifacts``: :class:`ArtifactRepository`;
- ``jobs``: :class:`JobRepository` (tenant-scoped reads, keyset pages, row locks and the
  conditional writes of the state machine) and :class:`JobCursor`;
- ``events``: :class:`JobEventRepository`, the only place a ``JobEvent`` row is built.

Repositories only read and write rows: no commits (the caller owns the transaction),
no HTTP or queue concerns. Every read of tenant data takes ``org_id`` so that one
organization can never reach another's rows by id.

The keyword-only functions below are the same queries for callers that hold a session
and make one call (auth, the admin CLI, the artifact service).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from api.core.models import ApiKey, Artifact, Job, JobEvent, Organization
from api.core.repositories.accounts import ApiKeyRepository, OrganizationRepository
from api.core.repositories.artifacts import ArtifactRepository
from api.core.repositories.base import Repository
from api.core.repositories.events import MAX_PAGE_SIZE, JobEventRepository
from api.core.repositories.jobs import JobCursor, JobRepository

__all__ = [
    "MAX_PAGE_SIZE", "ApiKeyRepository", "ArtifactRepository", "JobCursor",
    "JobEventRepository", "JobRepository", "OrganizationRepository", "Repository",
    "append_event", "create_artifact", "create_job", "delete_artifact", "get_api_key_by_prefix",
    "get_artifact", "get_job", "get_job_by_idempotency_key", "get_org_by_name",
    "list_artifacts", "list_events", "list_jobs",
]


def get_org_by_name(*, session: Session, name: str) -> Organization | None:
    return OrganizationRepository(session).get_by_name(name)


def get_api_key_by_prefix(*, session: Session, prefix: str) -> ApiKey | None:
    return ApiKeyRepository(session).get_by_prefix(prefix)


def create_artifact(*, session: Session, **fields: Any) -> Artifact:
    """See :meth:`ArtifactRepository.create`."""
    return ArtifactRepository(session).create(**fields)


def get_artifact(*, session: Session, org_id: uuid.UUID, artifact_id: uuid.UUID) -> Artifact | None:
    return ArtifactRepository(session).get(org_id=org_id, artifact_id=artifact_id)


def list_artifacts(*, session: Session, org_id: uuid.UUID, kind: str | None = None,
                   limit: int = 100) -> Sequence[Artifact]:
    return ArtifactRepository(session).list(org_id=org_id, kind=kind, limit=limit)


def delete_artifact(*, session: Session, org_id: uuid.UUID, artifact_id: uuid.UUID) -> bool:
    return ArtifactRepository(session).delete(org_id=org_id, artifact_id=artifact_id)


def create_job(*, session: Session, **fields: Any) -> Job:
    """See :meth:`JobRepository.create`."""
    return JobRepository(session).create(**fields)


def get_job(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    return JobRepository(session).get(org_id=org_id, job_id=job_id)


def get_job_by_idempotency_key(*, session: Session, org_id: uuid.UUID, key: str) -> Job | None:
    return JobRepository(session).get_by_idempotency_key(org_id=org_id, key=key)


def list_jobs(*, session: Session, org_id: uuid.UUID, limit: int = 20,
              status: str | Sequence[str] | None = None,
              after: JobCursor | None = None) -> list[Job]:
    return JobRepository(session).list(org_id=org_id, limit=limit, status=status, after=after)


def append_event(*, session: Session, **fields: Any) -> JobEvent:
    """See :meth:`JobEventRepository.append`."""
    return JobEventRepository(session).append(**fields)


def list_events(*, session: Session, job_id: uuid.UUID, after_id: int = 0,
                limit: int = 100) -> list[JobEvent]:
    return JobEventRepository(session).list_after(job_id=job_id, after_id=after_id, limit=limit)
