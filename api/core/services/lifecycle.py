"""Every transition of a job, in one place (``queued → running → succeeded | failed |
cancelled``): the client's :func:`create` and :func:`cancel`; the worker's :func:`claim`,
:func:`heartbeat`, :func:`record_progress`, :func:`succeed`, :func:`fail`,
:func:`cancelled` and :func:`release`; the reaper's :func:`reap` and :func:`record_task_id`.

Each changes one job (under a row lock, or with a conditional UPDATE) through
:mod:`api.core.repositories`, writes the matching event and leaves the commit to the
caller's ``session_scope`` (:func:`create` and :func:`cancel` answer a request and commit
themselves). After the claim every write is conditional on the worker still owning the job
(``Job.worker``), so a worker presumed dead cannot overwrite what the reaper did since.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.models import ArtifactKind, Job, JobEventKind, JobStatus, Verdict, utcnow
from api.core.repositories import ArtifactRepository, JobEventRepository, JobRepository
from api.core.services.job_errors import (
    WORKER_LOST_DETAIL,
    IdempotencyKeyReused,
    JobAlreadyFinished,
    time_limit_error,
    worker_lost_error,
)
from api.core.services.job_queries import get
from api.core.services.job_types import Claim, ClaimOutcome, PurifiedModel, ReapPolicy, ReapReport
from api.core.services.jobs import JobRequest, _validate
from api.core.services.task_queue import TaskQueue

log = logging.getLogger(__name__)

REQUEUED_MESSAGE = "re-queued"


def _status_event(session: Session, job: Job, *, now: datetime,
                  message: str | None = None) -> None:
    JobEventRepository(session).append(
        job_id=job.id, kind=JobEventKind.STATUS, status=job.status, stage=job.stage,
        message=message, created_at=now, flush=False,
    )


def _finish(session: Session, job: Job, *, status: JobStatus, now: datetime,
            message: str | None) -> None:
    job.status = status.value
    job.finished_at = now
    job.heartbeat_at = now
    _status_event(session, job, now=now, message=message)


def _fail_with(session: Session, job: Job, error: dict[str, str], *, now: datetime) -> None:
    job.error = error
    _finish(session, job, status=JobStatus.FAILED, now=now, message=error.get("detail"))


def _requeue(session: Session, job: Job, *, now: datetime, reason: str) -> None:
    job.status = JobStatus.QUEUED.value
    job.worker = None
    job.stage = None
    _status_event(session, job, now=now, message=f"{REQUEUED_MESSAGE}: {reason}")


# -- the client's side ---------------------------------------------------------------------


def create(*, session: Session, queue: TaskQueue | None, org_id: uuid.UUID,
           request: JobRequest, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Validate and record a job, then enqueue it (after the commit; with the broker down
    it stays queued for the reaper). Returns ``(job, created)``: an ``idempotency_key``
    this organization used before returns that job for the same request (``created``
    False) and raises :class:`IdempotencyKeyReused` for a different one."""
    jobs = JobRepository(session)
    fingerprint = request.fingerprint()
    if idempotency_key is not None:
        existing = jobs.get_by_idempotency_key(org_id=org_id, key=idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False

    _validate(session=session, org_id=org_id, request=request)
    try:
        job = jobs.create(
            org_id=org_id, task=request.task, defense=request.defense, params=request.params,
            model_id=request.model_id, clean_dataset_id=request.clean_dataset_id,
            test_dataset_id=request.test_dataset_id,
            poisoned_dataset_id=request.poisoned_dataset_id, trigger=request.trigger,
            idempotency_key=idempotency_key, request_fingerprint=fingerprint,
        )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race.
        session.rollback()
        if idempotency_key is None:
            raise
        existing = jobs.get_by_idempotency_key(org_id=org_id, key=idempotency_key)
        if existing is None:
            raise
        return _replay(existing, fingerprint), False

    if queue is not None:
        _enqueue_after_commit(session=session, queue=queue, job=job)
    return job, True


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
    JobRepository(session).set_task_id(job_id=job.id, task_id=task_id, only_if_unset=True)
    session.commit()
    job.task_id = task_id


def cancel(*, session: Session, queue: TaskQueue | None, org_id: uuid.UUID,
           job_id: uuid.UUID) -> Job:
    """Queued: cancelled at once. Running: cancel requested (the worker stops between
    steps) and the task revoked. Finished: 409."""
    job = get(session=session, org_id=org_id, job_id=job_id)
    jobs, events = JobRepository(session), JobEventRepository(session)
    # Conditional updates: the worker may claim the job at the same moment.
    cancelled_now = {"status": JobStatus.CANCELLED.value, "finished_at": utcnow(),
                     "cancel_requested": True}
    if jobs.update_in_status(job_id=job.id, status=JobStatus.QUEUED, values=cancelled_now):
        events.append(job_id=job.id, kind=JobEventKind.STATUS, status=JobStatus.CANCELLED,
                      message="cancelled by the client")
        session.commit()
        session.refresh(job)
        return job
    if jobs.update_in_status(job_id=job.id, status=JobStatus.RUNNING,
                             values={"cancel_requested": True}):
        events.append(job_id=job.id, kind=JobEventKind.STATUS, status=JobStatus.RUNNING,
                      stage=job.stage, message="cancellation requested")
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


# -- the worker's side ---------------------------------------------------------------------


def _is_stale(job: Job, *, now: datetime, stale_after_s: float) -> bool:
    last_sign_of_life = job.heartbeat_at or job.started_at or job.created_at
    return (now - last_sign_of_life).total_seconds() > stale_after_s


def claim(*, session: Session, job_id: uuid.UUID, worker: str, stale_after_s: float,
          max_attempts: int, owner_alive: Callable[[str], bool] = lambda owner: True,
          now: datetime | None = None) -> Claim:
    """Take a job for ``worker``: queued (or running under a dead worker) → running.

    Idempotent against duplicate deliveries: a terminal job is left alone, a job
    running under a live heartbeat of another worker too (``owner_alive`` lets
    the caller declare an owner dead sooner, e.g. a killed process on this host).
    """
    now = now or utcnow()
    job = JobRepository(session).lock(job_id)
    if job is None:
        return Claim(ClaimOutcome.MISSING)
    if job.is_terminal:
        return Claim(ClaimOutcome.TERMINAL, job.attempts)
    if job.cancel_requested:
        _finish(session, job, status=JobStatus.CANCELLED, now=now,
                message="cancelled before it started")
        return Claim(ClaimOutcome.CANCELLED, job.attempts)
    if job.status == JobStatus.RUNNING.value:
        owner = job.worker or ""
        if (owner != worker and not _is_stale(job, now=now, stale_after_s=stale_after_s)
                and owner_alive(owner)):
            return Claim(ClaimOutcome.BUSY, job.attempts)
    if job.attempts >= max_attempts:
        _fail_with(session, job, worker_lost_error(attempts=job.attempts), now=now)
        return Claim(ClaimOutcome.EXHAUSTED, job.attempts)
    job.status = JobStatus.RUNNING.value
    job.attempts += 1
    job.started_at = now
    job.heartbeat_at = now
    job.worker = worker
    job.stage = "loading"
    job.progress_step = None
    job.progress_total = None
    job.progress_metrics = None
    job.error = None
    _status_event(session, job, now=now, message=f"attempt {job.attempts} on {worker}")
    return Claim(ClaimOutcome.CLAIMED, job.attempts)


def heartbeat(*, session: Session, job_id: uuid.UUID, worker: str,
              now: datetime | None = None) -> bool:
    """Refresh ``heartbeat_at``; False when ``worker`` no longer owns the running job."""
    return JobRepository(session).update_owned(job_id=job_id, worker=worker,
                                               values={"heartbeat_at": now or utcnow()})


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if not metrics:
        return None
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        clean[str(key)] = number if math.isfinite(number) else None  # type: ignore[assignment]
    return clean


def record_progress(*, session: Session, job_id: uuid.UUID, worker: str, stage: str, step: int,
                    total: int | None, metrics: Mapping[str, Any] | None = None,
                    now: datetime | None = None) -> bool:
    """Write a progress event and mirror it on the job (stage, step/total, metrics, heartbeat).

    Returns False (and writes nothing) when ``worker`` no longer owns the job.
    Throttling is the caller's business (see ``worker.channel.ProgressThrottle``).
    """
    now = now or utcnow()
    values = _clean_metrics(metrics)
    step, total = int(step), None if total is None else int(total)
    owned = JobRepository(session).update_owned(job_id=job_id, worker=worker, values={
        "stage": stage, "progress_step": step, "progress_total": total,
        "progress_metrics": values, "heartbeat_at": now,
    })
    if not owned:
        return False
    JobEventRepository(session).append(
        job_id=job_id, kind=JobEventKind.PROGRESS, stage=stage, step=step, total=total,
        metrics=values, created_at=now, flush=False,
    )
    return True


def succeed(*, session: Session, job_id: uuid.UUID, worker: str, result: dict[str, Any],
            purified: PurifiedModel | None, now: datetime | None = None) -> Job | None:
    """Result, purified-model artifact (when the job produced one), the model's latest
    screening (when the job screened it) and status in ONE transaction.

    Returns the job, or None when ``worker`` no longer owns it (the caller then deletes
    the object it stored); ``job.purified_model_id`` is the new artifact's id.
    """
    now = now or utcnow()
    job = JobRepository(session).lock(job_id)
    if job is None or job.status != JobStatus.RUNNING.value or job.worker != worker:
        return None
    artifacts = ArtifactRepository(session)
    if purified is not None:
        artifact = artifacts.create(
            artifact_id=purified.artifact_id, org_id=job.org_id,
            kind=ArtifactKind.PURIFIED_MODEL.value, format=purified.format,
            filename=purified.filename, size=purified.size, sha256=purified.sha256,
            storage_key=purified.storage_key, meta={"job_id": str(job.id), **purified.meta},
            created_at=now,
        )
        job.purified_model_id = artifact.id
    screening = screening_of(result)
    if screening is not None:
        artifacts.record_screening(org_id=job.org_id, artifact_id=job.model_id, job_id=job.id,
                                   verdict=screening["verdict"], score=screening["score"],
                                   target=screening["target"], at=now)
    job.result = result
    job.error = None
    job.progress_metrics = None
    _finish(session, job, status=JobStatus.SUCCEEDED, now=now, message=None)
    return job


def screening_of(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The verdict, score and target of the screening in a job's Result document: its
    ``screening`` section, or the document itself for a ``screen`` job (a ScreeningReport)."""
    section = result.get("screening") if isinstance(result.get("screening"), dict) else result
    verdict = section.get("verdict")
    if verdict not in {v.value for v in Verdict}:
        return None
    score, target = section.get("score"), section.get("target")
    score_ok = isinstance(score, (int, float)) and not isinstance(score, bool) and 0.0 <= score <= 1.0
    target_ok = isinstance(target, int) and not isinstance(target, bool) and target >= 0
    return {"verdict": verdict, "score": float(score) if score_ok else None,
            "target": target if target_ok else None}


def _lock_unfinished(session: Session, job_id: uuid.UUID, worker: str | None) -> Job | None:
    """The job, locked, unless it is terminal or (with ``worker``) no longer that worker's."""
    job = JobRepository(session).lock(job_id)
    if job is None or job.is_terminal or (worker is not None and job.worker != worker):
        return None
    return job


def fail(*, session: Session, job_id: uuid.UUID, error: dict[str, str],
         worker: str | None = None, now: datetime | None = None) -> bool:
    """Mark the job failed with a problem-style ``error``. With ``worker`` given,
    only if that worker still owns it; a terminal job is never changed."""
    job = _lock_unfinished(session, job_id, worker)
    if job is None:
        return False
    _fail_with(session, job, error, now=now or utcnow())
    return True


def cancelled(*, session: Session, job_id: uuid.UUID, worker: str | None = None,
              now: datetime | None = None) -> bool:
    """Mark the job cancelled (the worker stopped at a cancel check)."""
    job = _lock_unfinished(session, job_id, worker)
    if job is None:
        return False
    _finish(session, job, status=JobStatus.CANCELLED, now=now or utcnow(), message="cancelled")
    return True


def release(*, session: Session, job_id: uuid.UUID, worker: str, reason: str,
            now: datetime | None = None) -> bool:
    """Give a running job back to the queue (the caller re-delivers it, e.g. a task retry)."""
    job = JobRepository(session).lock(job_id)
    if job is None or job.status != JobStatus.RUNNING.value or job.worker != worker:
        return False
    _requeue(session, job, now=now or utcnow(), reason=reason)
    return True


# -- the reaper's side ---------------------------------------------------------------------


def reap(*, session: Session, policy: ReapPolicy, resend_limit: int | None = None,
         now: datetime | None = None) -> ReapReport:
    """Find lost running jobs and forgotten queued ones; fix their rows.

    The caller commits, then enqueues ``report.to_enqueue`` (the task is idempotent, so a
    duplicate message is harmless) and records each task id with :func:`record_task_id`.
    A queued job's last (re-)enqueue time is its newest "queued" status event, else its
    creation. ``resend_limit`` caps how many forgotten queued jobs are sent again (the
    caller may know how many messages are already waiting in the broker).
    """
    now = now or utcnow()
    jobs, events = JobRepository(session), JobEventRepository(session)
    stale_before = now - timedelta(seconds=policy.stale_after_s)
    requeued: list[uuid.UUID] = []
    failed: list[uuid.UUID] = []
    cancelled_ids: list[uuid.UUID] = []
    for job in jobs.lock_stale_running(before=stale_before, limit=policy.batch):
        if job.cancel_requested:
            _finish(session, job, status=JobStatus.CANCELLED, now=now,
                    message="cancelled (worker lost)")
            cancelled_ids.append(job.id)
        elif (
            policy.time_limit_s is not None
            and job.started_at is not None
            and (now - job.started_at).total_seconds() > policy.time_limit_s
        ):
            _fail_with(session, job, time_limit_error(limit_s=policy.time_limit_s), now=now)
            failed.append(job.id)
        elif job.attempts < policy.max_attempts:
            _requeue(session, job, now=now, reason=WORKER_LOST_DETAIL)
            requeued.append(job.id)
        else:
            _fail_with(session, job, worker_lost_error(attempts=job.attempts), now=now)
            failed.append(job.id)
        log.warning("reaper: job %s had a stale heartbeat (%s) -> %s", job.id, job.heartbeat_at,
                    job.status)

    queued_before = now - timedelta(seconds=policy.queued_after_s)
    resend: list[uuid.UUID] = []
    for job_id, _created in jobs.queued_since_before(before=queued_before, limit=policy.batch):
        if resend_limit is not None and len(resend) >= resend_limit:
            break
        if job_id in requeued:
            continue
        last_queued = events.last_queued_at(job_id=job_id)
        if last_queued is not None and last_queued >= queued_before:
            continue
        events.append(
            job_id=job_id, kind=JobEventKind.STATUS, status=JobStatus.QUEUED,
            message=f"{REQUEUED_MESSAGE}: not picked up within {policy.queued_after_s:.0f} s",
            created_at=now, flush=False,
        )
        resend.append(job_id)
    return ReapReport(requeued=requeued, failed=failed, cancelled=cancelled_ids, resend=resend)


def record_task_id(*, session: Session, job_id: uuid.UUID, task_id: str) -> None:
    """The task id of the message just sent for the job (by the reaper)."""
    JobRepository(session).set_task_id(job_id=job_id, task_id=task_id)
