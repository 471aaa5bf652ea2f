"""Artifacts (uploaded models and datasets, purified models), always scoped by organization."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, or_, update

from api.core.models import Artifact, ArtifactKind
from api.core.repositories.base import Repository
from api.core.repositories.events import page_size


class ArtifactRepository(Repository[Artifact]):
    model = Artifact

    def create(
        self,
        *,
        org_id: uuid.UUID,
        kind: str,
        format: str,
        filename: str,
        size: int,
        sha256: str,
        storage_key: str,
        role: str | None = None,
        meta: dict[str, Any] | None = None,
        artifact_id: uuid.UUID | None = None,
        created_at: datetime | None = None,
    ) -> Artifact:
        """Add an artifact row (flushed, not committed). ``artifact_id`` lets the caller pick
        the id up front, e.g. to derive the storage key from it."""
        artifact = Artifact(
            id=artifact_id or uuid.uuid4(),
            org_id=org_id,
            kind=str(kind),
            role=str(role) if role is not None else None,
            format=format,
            filename=filename,
            size=size,
            sha256=sha256,
            storage_key=storage_key,
            meta=dict(meta or {}),
        )
        if created_at is not None:
            artifact.created_at = created_at
        return self.add(artifact, flush=True)

    def get(self, *, org_id: uuid.UUID, artifact_id: uuid.UUID) -> Artifact | None:
        """The artifact if it exists AND belongs to ``org_id``."""
        return self.get_one_or_none(
            self.base_statement().where(Artifact.id == artifact_id, Artifact.org_id == org_id)
        )

    def list(self, *, org_id: uuid.UUID, kind: str | None = None,
             limit: int = 100) -> Sequence[Artifact]:
        """The organization's artifacts, newest first."""
        query = self.base_statement().where(Artifact.org_id == org_id)
        if kind is not None:
            query = query.where(Artifact.kind == str(kind))
        query = query.order_by(Artifact.created_at.desc(), Artifact.id.desc())
        return self.get_all(query.limit(page_size(limit)))

    def record_screening(self, *, org_id: uuid.UUID, artifact_id: uuid.UUID, job_id: uuid.UUID,
                         verdict: str, score: float | None, target: int | None, at: datetime) -> None:
        """The model's latest screening (kept unless a later one is already recorded)."""
        self.session.execute(
            update(Artifact)
            .where(Artifact.id == artifact_id, Artifact.org_id == org_id,
                   or_(Artifact.screened_at.is_(None), Artifact.screened_at <= at))
            .values(screening_verdict=verdict, screening_score=score, screening_target=target,
                    screening_job_id=job_id, screened_at=at)
            .execution_options(synchronize_session=False)
        )

    def list_models(self, *, org_id: uuid.UUID, verdict: str | None = None, limit: int = 20,
                    after: tuple[datetime, uuid.UUID] | None = None) -> Sequence[Artifact]:
        """The organization's uploaded models newest first (``created_at DESC, id DESC``),
        keyset-paginated after ``(created_at, id)``; ``verdict`` keeps those whose latest
        screening says so. Served by ``ix_artifacts_org_id_verdict_created_at_id``."""
        query = self.base_statement().where(Artifact.org_id == org_id,
                                            Artifact.kind == ArtifactKind.MODEL.value)
        if verdict is not None:
            query = query.where(Artifact.screening_verdict == verdict)
        if after is not None:
            created_at, last_id = after
            query = query.where(or_(Artifact.created_at < created_at,
                                    and_(Artifact.created_at == created_at, Artifact.id < last_id)))
        query = query.order_by(Artifact.created_at.desc(), Artifact.id.desc())
        return self.get_all(query.limit(page_size(limit)))

    def delete(self, *, org_id: uuid.UUID, artifact_id: uuid.UUID) -> bool:
        """Delete the row (not the stored object); True if a row of ``org_id`` was deleted."""
        result = self.session.execute(
            delete(Artifact).where(Artifact.id == artifact_id, Artifact.org_id == org_id)
        )
        return bool(result.rowcount)
