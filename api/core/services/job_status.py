"""``GET /v1/jobs/{id}``, the hot path: the status document and how it is read.

One primary-key SELECT scoped by organization, returning exactly the columns ``JobRead``
shows and, of the (possibly large) Result document, only the four members of the
summary, extracted by the database. The columns are listed once (``_JOB_ATTRIBUTES`` and
``_SUMMARY_PATHS``); from them come the SQLAlchemy statement, the PostgreSQL batch
statement (the SQLAlchemy select compiled for psycopg), and the row of an ORM ``Job``
(:func:`job_view`, for the endpoints that already hold one). Every path builds the
document with :func:`_status_document`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, Select, any_, bindparam, select
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.sql import visitors

from api.core.errors import NotFound
from api.core.models import Job

log = logging.getLogger(__name__)

STATUS_BATCH_MAX = 256
# A poll waiting for a connection: (job_id, org_id, the future its request awaits).
_Waiting = tuple[uuid.UUID, uuid.UUID, "asyncio.Future[dict[str, Any]]"]

# The status document's columns, in the order _status_document unpacks them: the job's
# own columns, then whether it has a Result and the Result members of the summary.
_JOB_ATTRIBUTES = (
    "id", "task", "status", "stage", "progress_step", "progress_total", "progress_metrics", "defense",
    "params", "model_id", "clean_dataset_id", "test_dataset_id", "poisoned_dataset_id",
    "trigger", "created_at", "started_at", "finished_at", "cancel_requested", "attempts",
    "error", "purified_model_id",
)
_SUMMARY_PATHS = (
    ("metrics", "before"), ("metrics", "after"), ("der",), ("fidelity",),
    # the screening: a section of a purify or intake Result, a screen job's whole Result
    ("screening", "verdict"), ("screening", "score"), ("screening", "target"),
    ("verdict",), ("score",), ("target",),
)

_RESULT = Job.__table__.c.result
_STATUS_COLUMNS = (
    *(getattr(Job, name) for name in _JOB_ATTRIBUTES),
    _RESULT.is_not(None),
    *(_RESULT[path] if len(path) > 1 else _RESULT[path[0]] for path in _SUMMARY_PATHS),
)
_STATUS_QUERY = select(*_STATUS_COLUMNS).where(
    Job.id == bindparam("job_id"), Job.org_id == bindparam("org_id")
)


def _psycopg_sql(statement: Select[Any], *, parameters: Sequence[str]) -> str:
    """``statement`` as SQL for psycopg: ``parameters`` stay ``%(name)s`` placeholders,
    every other bound value (the JSON paths) is rendered inline, as a literal."""

    def inline(bind: Any) -> None:
        if bind.key not in parameters:
            bind.literal_execute = True

    inlined = visitors.cloned_traverse(statement, {}, {"bindparam": inline})
    compiled = inlined.compile(dialect=psycopg_dialect.dialect(),
                               compile_kwargs={"render_postcompile": True})
    return compiled.string


# A batch of polls; org_id last, to hand each row only to a request of its organization.
_PG_STATUS_BATCH_SQL = _psycopg_sql(
    select(*_STATUS_COLUMNS, Job.org_id).where(Job.id == any_(bindparam("job_ids", value=[]))),
    parameters=("job_ids",),
)


def _status_document(row: Sequence[Any]) -> dict[str, Any]:
    """A row of the status columns as ``JobRead``."""
    (job_id, task, status, stage, step, total, progress_metrics, defense, params, model_id,
     clean_id, test_id, poisoned_id, trigger, created_at, started_at, finished_at,
     cancel_requested, attempts, error, purified_id, has_result, before, after, der,
     fidelity, section_verdict, section_score, section_target, verdict, score, target) = row
    if section_verdict is not None:
        verdict, score, target = section_verdict, section_score, section_target
    summary = None
    if has_result:
        summary = {"before": before, "after": after, "der": der, "fidelity": fidelity,
                   "screening": (None if verdict is None else
                                 {"verdict": verdict, "score": score, "target": target}),
                   "purified": purified_id is not None}
    return {
        "id": job_id,
        "task": task or "purify",
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
        "summary": summary,
        "error": error,
        "purified_model_id": purified_id,
    }


def _result_member(document: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def job_view(job: Job) -> dict[str, Any]:
    """An ORM job as ``JobRead``: the row the status query would return, as a document."""
    document = job.result if isinstance(job.result, dict) else None
    return _status_document((
        *(getattr(job, name) for name in _JOB_ATTRIBUTES),
        document is not None,
        *(_result_member(document, path) for path in _SUMMARY_PATHS),
    ))


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
        self._waiting: list[_Waiting] = []
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

    async def _run(self, batch: list[_Waiting]) -> None:
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
                except Exception as exc:
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
