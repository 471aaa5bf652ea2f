"""Jobs as the client sees them: create (validated, idempotent), read, list, cancel.

The worker's side of the state machine (claim, progress, finish) lives in
``api.core.services.runs``. The task is enqueued by NAME only after the job
row is committed; if the broker is down the job simply stays ``queued`` and the
worker's reaper re-enqueues it later.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo

from sqlalchemy import Engine, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core import repositories as repo
from api.core.errors import Conflict, InvalidInput, NotFound
from api.core.models import (
    Artifact,
    ArtifactKind,
    DatasetRole,
    Job,
    JobEvent,
    JobEventKind,
    JobStatus,
    utcnow,
)
from api.core.services import RejectedInput, from_input_error
from api.core.services import artifacts as artifact_service
from defense_core.errors import InputError

if TYPE_CHECKING:
    from celery import Celery

    from api.core.settings import Settings

log = logging.getLogger(__name__)

MAX_PAGE = 100


# -- errors --------------------------------------------------------------------------------


class IdempotencyKeyReused(InvalidInput):
    type = "idempotency-key-reused"
    title = "Idempotency key reused with a different request"


class JobNotSucceeded(Conflict):
    type = "job-not-succeeded"
    title = "Job has not succeeded"


class JobAlreadyFinished(Conflict):
    type = "job-already-finished"
    title = "Job already finished"


class InvalidCursor(InvalidInput):
    type = "invalid-cursor"
    title = "Invalid cursor"


# -- the queue seen from here -----------------------------------------------------------------


class TaskQueue(Protocol):
    def enqueue_purify(self, job_id: uuid.UUID) -> str: ...

    def revoke(self, task_id: str | None) -> bool: ...


class CeleryTaskQueue:
    """Sends tasks by name through ``api.core.queue`` with one lazily built Celery app."""

    def __init__(self, settings: "Settings") -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def _celery(self) -> "Celery":
        with self._lock:
            if self._app is None:
                from api.core import queue

                self._app = queue.make_celery(self._settings)
            return self._app

    def warm_up(self) -> None:
        """Build the Celery app and the parts a first send loads lazily (no connection is
        made), so that a served process imports them at start-up (see ``create_app``)."""
        app = self._celery()
        for part in ("loader", "amqp", "events", "tasks", "backend"):
            try:
                getattr(app, part)
            except Exception:  # a broken setting is reported by the first real send
                log.warning("celery warm-up: %s failed", part, exc_info=True)

    def enqueue_purify(self, job_id: uuid.UUID) -> str:
        from api.core import queue

        return queue.enqueue_purify(settings=self._settings, job_id=job_id, app=self._celery())

    def revoke(self, task_id: str | None) -> bool:
        from api.core import queue

        if not task_id:
            return False
        return queue.revoke(settings=self._settings, task_id=task_id, app=self._celery())


# -- creation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRequest:
    """What a client asks for (the body of ``POST /v1/jobs``)."""

    model_id: uuid.UUID
    clean_dataset_id: uuid.UUID
    test_dataset_id: uuid.UUID | None = None
    poisoned_dataset_id: uuid.UUID | None = None
    trigger: dict[str, Any] | None = None
    defense: str = "tsbd"
    params: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the request (defaults included)."""
        canonical = json.dumps(
            {
                "model_id": str(self.model_id),
                "clean_dataset_id": str(self.clean_dataset_id),
                "test_dataset_id": _str_or_none(self.test_dataset_id),
                "poisoned_dataset_id": _str_or_none(self.poisoned_dataset_id),
                "trigger": self.trigger,
                "defense": self.defense,
                "params": self.params,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _str_or_none(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def create(
    *,
    session: Session,
    queue: TaskQueue | None,
    org_id: uuid.UUID,
    request: JobRequest,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate and record a job, then enqueue it. Returns ``(job, created)``.

    With an ``idempotency_key`` already used by this organization: the same request
    returns the existing job (``created`` False), a different one raises
    :class:`IdempotencyKeyReused`.
    """
    fingerprint = request.fingerprint()
    if idempotency_key is not None:
        existing = _by_idempotency_key(session=session, org_id=org_id, key=idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False

    _validate(session=session, org_id=org_id, request=request)
    try:
        job = repo.create_job(
            session=session,
            org_id=org_id,
            defense=request.defense,
            params=request.params,
            model_id=request.model_id,
            clean_dataset_id=request.clean_dataset_id,
            test_dataset_id=request.test_dataset_id,
            poisoned_dataset_id=request.poisoned_dataset_id,
            trigger=request.trigger,
            idempotency_key=idempotency_key,
            request_fingerprint=fingerprint,
        )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race.
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _by_idempotency_key(session=session, org_id=org_id, key=idempotency_key)
        if existing is None:
            raise
        return _replay(existing, fingerprint), False

    if queue is not None:
        _enqueue_after_commit(session=session, queue=queue, job=job)
    return job, True


def _by_idempotency_key(*, session: Session, org_id: uuid.UUID, key: str) -> Job | None:
    return repo.get_job_by_idempotency_key(session=session, org_id=org_id, key=key)


def _replay(existing: Job, fingerprint: str) -> Job:
    if existing.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new job",
            extra={"job_id": str(existing.id)},
        )
    return existing


def _enqueue_after_commit(*, session: Session, queue: TaskQueue, job: Job) -> None:
    try:
        task_id = queue.enqueue_purify(job.id)
    except Exception:
        log.warning("could not enqueue job %s; it stays queued for the reaper", job.id,
                    exc_info=True)
        return
    # Only record the task id if nothing else touched the job meanwhile.
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.task_id.is_(None))
        .values(task_id=task_id)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job.task_id = task_id


def _purify_request(request: JobRequest) -> Any:
    """The engine's request for this job (its rules: :mod:`defense_core.jobs.request`)."""
    from defense_core.jobs.request import PurifyRequest

    return PurifyRequest(model=request.model_id, clean=request.clean_dataset_id,
                         test=request.test_dataset_id, poisoned=request.poisoned_dataset_id,
                         trigger=request.trigger, defense=request.defense, params=request.params)


def _field_names() -> Any:
    """How the engine's messages name the inputs: the fields of the request body."""
    from defense_core.jobs.request import InputNames

    return InputNames(test="test_dataset_id", poisoned="poisoned_dataset_id", trigger="trigger",
                      poisoned_data="poisoned_dataset_id or trigger")


def _validate(*, session: Session, org_id: uuid.UUID, request: JobRequest) -> None:
    """The engine's rules (:meth:`PurifyRequest.validate`) and the checks that need the
    database: the artifacts exist, belong to the organization and fit the model."""
    import dataclasses

    names = _field_names()
    engine_request = _purify_request(request)
    try:  # what needs no model spec first: a malformed request reads nothing
        engine_request.check_inputs(names=names)
    except InputError as exc:
        raise from_input_error(exc) from None

    model = artifact_service.get(
        session=session, org_id=org_id, artifact_id=request.model_id, what="model",
    )
    if model.kind not in (ArtifactKind.MODEL, ArtifactKind.PURIFIED_MODEL):
        raise RejectedInput(f"model_id {model.id} is a {model.kind}, not a model",
                            slug="wrong-artifact-kind")
    spec = (model.meta or {}).get("spec")
    if not isinstance(spec, dict):
        raise RejectedInput(f"model {model.id} has no model spec", slug="wrong-artifact-kind")

    for field_name, role in (
        ("clean_dataset_id", DatasetRole.CLEAN),
        ("test_dataset_id", DatasetRole.TEST),
        ("poisoned_dataset_id", DatasetRole.POISONED),
    ):
        dataset_id = getattr(request, field_name)
        if dataset_id is None:
            continue
        dataset = artifact_service.get(
            session=session, org_id=org_id, artifact_id=dataset_id, what="dataset",
        )
        _check_dataset(dataset, field_name=field_name, role=role, spec=spec)

    try:
        dataclasses.replace(engine_request, spec=spec).validate(names=names)
    except InputError as exc:
        raise from_input_error(exc) from None


def _check_dataset(dataset: Artifact, *, field_name: str, role: DatasetRole,
                   spec: dict[str, Any]) -> None:
    if dataset.kind != ArtifactKind.DATASET:
        raise RejectedInput(f"{field_name} {dataset.id} is a {dataset.kind}, not a dataset",
                            slug="wrong-artifact-kind")
    if dataset.role != role.value:
        raise RejectedInput(
            f"{field_name} {dataset.id} was uploaded with role {dataset.role!r}; "
            f"expected {role.value!r}",
            slug="wrong-dataset-role",
        )
    info = (dataset.meta or {}).get("validation") or {}
    expected_shape = [spec["in_channels"], *spec["input_size"]]
    shape = info.get("image_shape")
    if shape is not None and list(shape) != expected_shape:
        raise RejectedInput(
            f"{field_name}: images are {'x'.join(map(str, shape))} but the model expects "
            f"{'x'.join(map(str, expected_shape))}",
            slug="shape-mismatch",
        )
    num_classes = int(spec["num_classes"])
    label_min, label_max = info.get("label_min"), info.get("label_max")
    if (label_min is not None and label_min < 0) or (
        label_max is not None and label_max >= num_classes
    ):
        raise RejectedInput(
            f"{field_name}: labels span [{label_min}, {label_max}] but the model has "
            f"{num_classes} classes",
            slug="label-out-of-range",
        )
    targets = info.get("target_labels") or []
    bad_targets = [t for t in targets if not 0 <= int(t) < num_classes]
    if bad_targets:
        raise RejectedInput(
            f"{field_name}: target labels {bad_targets} are outside [0, {num_classes - 1}]",
            slug="label-out-of-range",
        )


def _check_trigger(trigger: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """The engine's trigger rules against the model spec, as a problem."""
    from defense_core.jobs.request import check_trigger

    try:
        check_trigger(trigger, spec=spec)
    except InputError as exc:
        raise from_input_error(exc) from None


# -- reading ---------------------------------------------------------------------------------


def get(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The caller's job, or 404 (also for another organization's job)."""
    job = repo.get_job(session=session, org_id=org_id, job_id=job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


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
    if not 1 <= limit <= MAX_PAGE:
        raise RejectedInput(f"limit must be in [1, {MAX_PAGE}], got {limit}", slug="invalid-input")
    after = None
    if cursor is not None:
        try:
            after = repo.JobCursor.decode(cursor)
        except InvalidInput:
            raise InvalidCursor("the cursor is not one this API returned") from None
    # One row more than asked tells whether a next page exists.
    rows = repo.list_jobs(session=session, org_id=org_id, limit=limit + 1, status=status,
                          after=after)
    items = rows[:limit]
    more = len(rows) > limit
    return JobPage(items=items,
                   next_cursor=repo.JobCursor.after(items[-1]).encode() if more else None)


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
    return repo.list_events(session=session, job_id=job_id, after_id=after, limit=limit)


def result(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
    """The stored Result document of a succeeded job (409 otherwise)."""
    job = get(session=session, org_id=org_id, job_id=job_id)
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        raise JobNotSucceeded(f"job {job_id} is {job.status}; a result exists once it has succeeded",
                              extra={"job_status": job.status})
    return job.result


def purified_model(*, session: Session, org_id: uuid.UUID, job_id: uuid.UUID) -> Artifact:
    """The purified model artifact of a succeeded job (409 before that)."""
    job = get(session=session, org_id=org_id, job_id=job_id)
    if job.status != JobStatus.SUCCEEDED or job.purified_model_id is None:
        raise JobNotSucceeded(
            f"job {job_id} is {job.status}; the purified model exists once it has succeeded",
            extra={"job_status": job.status},
        )
    return artifact_service.get(session=session, org_id=org_id,
                                artifact_id=job.purified_model_id, what="purified model")


# -- status polling -------------------------------------------------------------------------
#
# ``GET /v1/jobs/{id}`` is the hot path: one primary-key SELECT scoped by organization,
# returning exactly the columns ``JobRead`` shows and, of the (possibly large) Result
# document, only the four members of the summary, extracted by the database. Both readers
# below select these columns in this order and build the document with _status_document.

_RESULT = Job.__table__.c.result
_STATUS_COLUMNS = (
    Job.id, Job.status, Job.stage, Job.progress_step, Job.progress_total,
    Job.progress_metrics, Job.defense, Job.params, Job.model_id, Job.clean_dataset_id,
    Job.test_dataset_id, Job.poisoned_dataset_id, Job.trigger, Job.created_at,
    Job.started_at, Job.finished_at, Job.cancel_requested, Job.attempts, Job.error,
    Job.purified_model_id,
    _RESULT.is_not(None),
    _RESULT[("metrics", "before")],
    _RESULT[("metrics", "after")],
    _RESULT["der"],
    _RESULT["fidelity"],
)
_STATUS_QUERY = select(*_STATUS_COLUMNS).where(
    Job.id == bindparam("job_id"), Job.org_id == bindparam("org_id")
)
# The same statement for psycopg (PostgreSQL, ``jsonb`` paths).
_PG_STATUS_COLUMNS = (
    "id, status, stage, progress_step, progress_total, progress_metrics, defense, "
    "params, model_id, clean_dataset_id, test_dataset_id, poisoned_dataset_id, trigger, "
    "created_at, started_at, finished_at, cancel_requested, attempts, error, "
    "purified_model_id, result IS NOT NULL, result #> '{metrics,before}', "
    "result #> '{metrics,after}', result -> 'der', result -> 'fidelity'"
)
# A batch of polls; org_id last, to hand each row only to a request of its organization.
_PG_STATUS_BATCH_SQL = f"SELECT {_PG_STATUS_COLUMNS}, org_id FROM jobs WHERE id = ANY(%(job_ids)s)"
STATUS_BATCH_MAX = 256


def _status_document(row: Sequence[Any]) -> dict[str, Any]:
    """A row of the status columns as ``JobRead`` (same keys and values as ``job_view``)."""
    (job_id, status, stage, step, total, progress_metrics, defense, params, model_id,
     clean_id, test_id, poisoned_id, trigger, created_at, started_at, finished_at,
     cancel_requested, attempts, error, purified_id, has_result, before, after, der,
     fidelity) = row
    return {
        "id": job_id,
        "status": status,
        "stage": stage,
        "progress": {"step": step, "total": total, "metrics": progress_metrics},
        "defense": defense,
        "params": params or {},
        "model_id": model_id,
        "clean_dataset_id": clean_id,
        "test_dataset_id": test_id,
        "poisoned_dataset_id": poisoned_id,
        "trigger": trigger,
        "created_at": created_at,
        "started_at": started_at,
        "finished_at": finished_at,
        "cancel_requested": bool(cancel_requested),
        "attempts": attempts or 0,
        "summary": ({"before": before, "after": after, "der": der, "fidelity": fidelity}
                    if has_result else None),
        "error": error,
        "purified_model_id": purified_id,
    }


def status_view(*, engine: Engine, org_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
    """The caller's job as ``JobRead`` (blocking; any database), or 404."""
    with engine.connect() as connection:
        row = connection.execute(_STATUS_QUERY, {"job_id": job_id, "org_id": org_id}).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return _status_document(row)


class StatusReader(Protocol):
    """Reads a job's status for ``GET /v1/jobs/{id}`` from the event loop."""

    async def view(self, *, org_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class ThreadedStatusReader:
    """:func:`status_view` in a worker thread (SQLite, the embedded database)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def view(self, *, org_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(
            functools.partial(status_view, engine=self._engine, org_id=org_id, job_id=job_id)
        )

    async def close(self) -> None:
        return None


class PgStatusReader:
    """Status reads on PostgreSQL with psycopg's asyncio connections: no thread hand-off
    and no ORM per poll, one prepared statement, autocommit.

    Polls that arrive while all ``size`` connections are busy are answered together:
    the next free connection reads every job they ask for with one ``id = ANY(...)``
    query, and each row goes to the request whose organization owns it (any other
    request gets :class:`NotFound`, exactly as the single-row query would). Under load
    this turns fifty concurrent polls into a few round trips instead of fifty; an idle
    reader still answers a lone poll with one query at once.

    Connections are opened on first use and reused. A connection found broken (database
    restarted) is dropped and the read is tried once more on a new connection.
    Connections belong to the event loop that opened them: :meth:`close` (at application
    shutdown) closes them.
    """

    def __init__(self, *, database_url: str, size: int, batch_max: int = STATUS_BATCH_MAX) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        from sqlalchemy.engine import make_url

        url = make_url(database_url)
        self._conninfo = make_conninfo(
            "", host=url.host, port=url.port, user=url.username, password=url.password,
            dbname=url.database, **{k: str(v) for k, v in url.query.items()},
        )
        self._size = size
        self._batch_max = batch_max
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._busy = 0
        self._waiting: list[tuple[uuid.UUID, uuid.UUID, asyncio.Future[dict[str, Any]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        # UTC session: timestamps come back as UTC, as the ORM's UTCDateTime gives them.
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, options="-c TimeZone=UTC"
        )

    async def _fetch(self, connection: psycopg.AsyncConnection[Any],
                     job_ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
        cursor = await connection.execute(_PG_STATUS_BATCH_SQL, {"job_ids": job_ids}, prepare=True)
        return await cursor.fetchall()

    async def view(self, *, org_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((job_id, org_id, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        """Start a batch on every free connection slot while polls are waiting."""
        while self._waiting and self._busy < self._size:
            batch = self._waiting[: self._batch_max]
            del self._waiting[: self._batch_max]
            self._busy += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[uuid.UUID, uuid.UUID, asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            rows = await self._read(list({job_id for job_id, _, _ in batch}))
        except BaseException as exc:
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:  # the reader is shutting down
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
        else:
            by_id = {row[0]: row for row in rows}
            for job_id, org_id, future in batch:
                if future.done():  # the request went away
                    continue
                row = by_id.get(job_id)
                if row is None or row[-1] != org_id:
                    future.set_exception(NotFound(f"job {job_id} not found"))
                    continue
                try:
                    future.set_result(_status_document(row[:-1]))
                except Exception as exc:  # one bad row must not leave the others waiting
                    future.set_exception(exc)
        finally:
            self._busy -= 1
            self._dispatch()

    async def _read(self, job_ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
        connection = self._idle.pop() if self._idle else await self._connect()
        try:
            try:
                rows = await self._fetch(connection, job_ids)
            except psycopg.OperationalError:
                if not connection.broken:
                    raise
                log.info("status read: connection lost; retrying on a new one")
                await connection.close()
                connection = await self._connect()
                rows = await self._fetch(connection, job_ids)
        except BaseException:
            await connection.close()
            raise
        self._idle.append(connection)
        return rows

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()


def make_status_reader(*, database_url: str, engine: Engine, pool_size: int) -> StatusReader:
    """:class:`PgStatusReader` on PostgreSQL, :class:`ThreadedStatusReader` otherwise."""
    if engine.dialect.name == "postgresql":
        return PgStatusReader(database_url=database_url, size=pool_size)
    return ThreadedStatusReader(engine)


def summary(job: Job) -> dict[str, Any] | None:
    """Headline metrics of a finished job (from its Result document)."""
    doc = job.result
    if not isinstance(doc, dict):
        return None
    metrics = doc.get("metrics") or {}
    return {
        "before": metrics.get("before"),
        "after": metrics.get("after"),
        "der": doc.get("der"),
        "fidelity": doc.get("fidelity"),
    }


def counts_by_status(*, session: Session) -> dict[str, int]:
    """Number of jobs per status across all organizations (for /metrics)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {str(status): int(count) for status, count in rows}


# -- cancel ---------------------------------------------------------------------------------


def cancel(*, session: Session, queue: TaskQueue | None, org_id: uuid.UUID,
           job_id: uuid.UUID) -> Job:
    """Queued: cancelled at once. Running: cancel requested (the worker stops between
    steps) and the task revoked. Finished: 409."""
    job = get(session=session, org_id=org_id, job_id=job_id)
    now = utcnow()
    # Conditional updates: the worker may claim the job at the same moment.
    cancelled_now = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.CANCELLED.value, finished_at=now, cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    if cancelled_now:
        repo.append_event(session=session, job_id=job.id, kind=JobEventKind.STATUS,
                          status=JobStatus.CANCELLED, message="cancelled by the client")
        session.commit()
        session.refresh(job)
        return job
    requested = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    if requested:
        repo.append_event(session=session, job_id=job.id, kind=JobEventKind.STATUS,
                          status=JobStatus.RUNNING, stage=job.stage,
                          message="cancellation requested")
        session.commit()
        session.refresh(job)
        if queue is not None:
            try:
                queue.revoke(job.task_id)
            except Exception:  # the database flag is what stops the job
                log.warning("revoke of task %s failed", job.task_id, exc_info=True)
        return job
    session.rollback()
    session.refresh(job)
    raise JobAlreadyFinished(f"job {job_id} is already {job.status}; nothing to cancel",
                             extra={"job_status": job.status})
