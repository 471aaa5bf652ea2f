"""Database schema (SQLAlchemy 2 typed models), portable across PostgreSQL and SQLite.

Conventions:
- ids are ``uuid.UUID`` (:class:`sqlalchemy.Uuid`: native ``uuid`` on PostgreSQL,
  ``CHAR(32)`` on SQLite), except job events which use an auto-incremented bigint
  so that "events after id N" is a cheap, ordered range scan;
- timestamps are timezone-aware UTC datetimes on both databases (:class:`UTCDateTime`);
- JSON documents are ``JSONB`` on PostgreSQL and ``JSON`` elsewhere;
- enumerations are short strings guarded by CHECK constraints; the allowed values
  live in the ``StrEnum`` classes below (their members compare equal to plain strings);
- constraint and index names follow :data:`NAMING_CONVENTION`, so migrations are stable.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the only clock the schema uses)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes.

    PostgreSQL keeps the offset (``timestamptz``); SQLite stores text without one, so
    values are converted to UTC before they are written and tagged UTC when read.
    Naive datetimes given by the caller are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012  (SQLAlchemy reads it from the class)
        datetime: UTCDateTime(),
        uuid.UUID: Uuid(),
        dict[str, Any]: JSONDocument,
        list[str]: JSONDocument,
    }


class ArtifactKind(StrEnum):
    MODEL = "model"
    DATASET = "dataset"
    PURIFIED_MODEL = "purified_model"


class DatasetRole(StrEnum):
    CLEAN = "clean"
    TEST = "test"
    POISONED = "poisoned"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATUSES


TERMINAL_JOB_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)


class Verdict(StrEnum):
    """A screening's verdict on a model (``defense_core.screening``)."""

    CLEAN = "clean"
    SUSPICIOUS = "suspicious"
    BACKDOORED = "backdoored"


class JobEventKind(StrEnum):
    STATUS = "status"
    PROGRESS = "progress"


def _one_of(column: str, values: type[StrEnum], *, nullable: bool = False) -> str:
    allowed = ", ".join(f"'{member.value}'" for member in values)
    check = f"{column} IN ({allowed})"
    return f"{column} IS NULL OR {check}" if nullable else check


class Organization(Base):
    """A tenant: API keys, artifacts and jobs belong to exactly one organization."""

    __tablename__ = "organizations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Accept models that carry code (TorchScript, torch.export) from this organization.
    allow_code_models: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())

    def __repr__(self) -> str:
        return f"Organization(id={self.id}, name={self.name!r})"


class ApiKey(Base):
    """An API key. Only the SHA-256 of its secret part is stored; ``prefix`` finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]

    org: Mapped[Organization] = relationship(lazy="joined")

    def is_active(self, *, now: datetime) -> bool:
        """Not revoked and not expired at ``now``."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > now

    def __repr__(self) -> str:
        return f"ApiKey(prefix={self.prefix!r}, org_id={self.org_id}, name={self.name!r})"


class Artifact(Base):
    """A file in the artifact store (model, dataset, purified model) and what validation found."""

    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint(_one_of("kind", ArtifactKind), name="kind"),
        CheckConstraint(_one_of("role", DatasetRole, nullable=True), name="role"),
        CheckConstraint("size >= 0", name="size_non_negative"),
        CheckConstraint(_one_of("screening_verdict", Verdict, nullable=True), name="screening_verdict"),
        Index("ix_artifacts_org_id_created_at", "org_id", "created_at"),
        # GET /v1/models?verdict=...: newest first within one verdict.
        Index("ix_artifacts_org_id_verdict_created_at_id", "org_id", "screening_verdict", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    role: Mapped[str | None] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512), unique=True)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The model's latest screening (a succeeded job that screened it), models only.
    screening_verdict: Mapped[str | None] = mapped_column(String(16))
    screening_score: Mapped[float | None] = mapped_column(Float)
    screening_target: Mapped[int | None]
    screening_job_id: Mapped[uuid.UUID | None]
    screened_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"Artifact(id={self.id}, kind={self.kind!r}, filename={self.filename!r})"


class Job(Base):
    """A job (``task``: a job kind of ``defense_core.jobs``); the database row is the source
    of truth for its state."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("status", JobStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        UniqueConstraint("org_id", "idempotency_key"),
        # Listing newest first: a B-tree is scanned backwards for
        # ORDER BY created_at DESC, id DESC, so ascending columns serve both directions.
        Index("ix_jobs_org_id_created_at_id", "org_id", "created_at", "id"),
        Index("ix_jobs_org_id_status_created_at", "org_id", "status", "created_at"),
        # The reaper: running jobs with an old heartbeat, queued jobs never picked up.
        Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    task: Mapped[str] = mapped_column(String(32), default="purify", server_default="purify")
    stage: Mapped[str | None] = mapped_column(String(32))
    progress_step: Mapped[int | None]
    progress_total: Mapped[int | None]
    progress_metrics: Mapped[dict[str, Any] | None]
    defense: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("artifacts.id", ondelete="RESTRICT"))
    clean_dataset_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("artifacts.id", ondelete="RESTRICT")
    )
    test_dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("artifacts.id", ondelete="RESTRICT")
    )
    poisoned_dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("artifacts.id", ondelete="RESTRICT")
    )
    trigger: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    purified_model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("artifacts.id", ondelete="SET NULL")
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )
    task_id: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES

    def __repr__(self) -> str:
        return f"Job(id={self.id}, status={self.status!r}, stage={self.stage!r})"


class JobEvent(Base):
    """One status transition or progress tick of a job, in insertion order (``id``)."""

    __tablename__ = "job_events"
    __table_args__ = (
        CheckConstraint(_one_of("kind", JobEventKind), name="kind"),
        Index("ix_job_events_job_id_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(32))
    step: Mapped[int | None]
    total: Mapped[int | None]
    metrics: Mapped[dict[str, Any] | None]
    message: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"JobEvent(id={self.id}, job_id={self.job_id}, kind={self.kind!r})"
