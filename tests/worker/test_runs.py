"""Job transitions made by the worker, and the reaper, on the real PostgreSQL schema."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.core.db import session_scope
from api.core.models import Artifact, Job, JobEvent
from api.core.services import job_errors, job_queries, job_types, lifecycle
from defense_core.errors import ModelLoadError
from worker.channel import ProgressThrottle

pytestmark = pytest.mark.postgres

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
W1 = "host-a:101"
W2 = "host-b:202"


def _job(factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with session_scope(factory) as session:
        return session.get(Job, job_id)


def _events(factory: sessionmaker[Session], job_id: uuid.UUID) -> list[JobEvent]:
    with session_scope(factory) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def _claim(factory, job_id, *, worker=W1, now=NOW, alive=lambda owner: True, max_attempts=2):
    with session_scope(factory) as session:
        return lifecycle.claim(
            session=session, job_id=job_id, worker=worker, stale_after_s=60,
            max_attempts=max_attempts, owner_alive=alive, now=now,
        )


def test_claim_moves_a_queued_job_to_running(session_factory, make_job):
    job_id = make_job()
    claim = _claim(session_factory, job_id)
    assert claim == job_types.Claim(job_types.ClaimOutcome.CLAIMED, 1)
    job = _job(session_factory, job_id)
    assert (job.status, job.attempts, job.worker, job.stage) == ("running", 1, W1, "loading")
    assert job.started_at == NOW and job.heartbeat_at == NOW
    events = _events(session_factory, job_id)
    assert [(e.kind, e.status) for e in events] == [("status", "running")]


def test_claim_is_a_no_op_for_missing_and_terminal_jobs(session_factory, make_job):
    assert _claim(session_factory, uuid.uuid4()).outcome is job_types.ClaimOutcome.MISSING
    job_id = make_job(status="succeeded", attempts=1)
    assert _claim(session_factory, job_id).outcome is job_types.ClaimOutcome.TERMINAL
    job = _job(session_factory, job_id)
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert _events(session_factory, job_id) == []


def test_claim_cancels_a_job_whose_cancel_was_requested(session_factory, make_job):
    job_id = make_job(cancel_requested=True)
    assert _claim(session_factory, job_id).outcome is job_types.ClaimOutcome.CANCELLED
    job = _job(session_factory, job_id)
    assert (job.status, job.attempts, job.finished_at) == ("cancelled", 0, NOW)


def test_claim_leaves_a_job_running_under_a_live_worker(session_factory, make_job):
    job_id = make_job(status="running", attempts=1, worker=W2, heartbeat_at=NOW - timedelta(seconds=30))
    assert _claim(session_factory, job_id).outcome is job_types.ClaimOutcome.BUSY
    assert _job(session_factory, job_id).worker == W2
    # the same row, but its owner is known dead (a killed process on this host): taken over
    dead = _claim(session_factory, job_id, alive=lambda owner: owner != W2)
    assert dead == job_types.Claim(job_types.ClaimOutcome.CLAIMED, 2)
    assert _job(session_factory, job_id).worker == W1


def test_claim_takes_over_a_stale_job_and_gives_up_after_max_attempts(session_factory, make_job):
    job_id = make_job(status="running", attempts=1, worker=W2, heartbeat_at=NOW - timedelta(seconds=61))
    assert _claim(session_factory, job_id) == job_types.Claim(job_types.ClaimOutcome.CLAIMED, 2)
    later = NOW + timedelta(seconds=120)
    assert _claim(session_factory, job_id, worker="host-c:1", now=later).outcome is job_types.ClaimOutcome.EXHAUSTED
    job = _job(session_factory, job_id)
    assert job.status == "failed"
    assert job.error["type"] == "worker-lost" and job.error["code"] == "worker-lost"
    assert "2 attempt" in job.error["detail"]


def test_progress_is_mirrored_on_the_job_and_refused_to_a_non_owner(session_factory, make_job):
    job_id = make_job()
    _claim(session_factory, job_id)
    at = NOW + timedelta(seconds=5)
    with session_scope(session_factory) as session:
        assert lifecycle.record_progress(
            session=session, job_id=job_id, worker=W1, stage="unlearning", step=3, total=10,
            metrics={"loss": 0.5, "bad": float("nan")}, now=at,
        )
    with session_scope(session_factory) as session:
        assert not lifecycle.record_progress(
            session=session, job_id=job_id, worker=W2, stage="finetuning", step=1, total=2, now=at,
        )
        assert not lifecycle.heartbeat(session=session, job_id=job_id, worker=W2, now=at)
    job = _job(session_factory, job_id)
    assert (job.stage, job.progress_step, job.progress_total) == ("unlearning", 3, 10)
    assert job.progress_metrics == {"loss": 0.5, "bad": None}
    assert job.heartbeat_at == at
    progress = [e for e in _events(session_factory, job_id) if e.kind == "progress"]
    assert [(e.stage, e.step, e.total) for e in progress] == [("unlearning", 3, 10)]


def test_progress_throttle_writes_stage_changes_and_last_steps_only_once_a_second():
    throttle = ProgressThrottle(interval_s=1.0)
    calls = [  # (stage, step, total, at) -> expected
        (("unlearning", 1, 100, 0.0), True),   # first tick
        (("unlearning", 2, 100, 0.5), False),  # too soon
        (("unlearning", 3, 100, 1.0), True),   # a second later
        (("ranking", 0, 5, 1.1), True),        # a new stage
        (("ranking", 4, 5, 1.2), False),
        (("ranking", 5, 5, 1.3), True),        # the stage's last step
    ]
    got = [throttle.should_write(stage=s, step=i, total=t, at=a) for (s, i, t, a), _ in calls]
    assert got == [expected for _, expected in calls]


def test_succeed_writes_result_artifact_and_status_together(session_factory, make_job):
    job_id = make_job()
    _claim(session_factory, job_id)
    artifact_id = uuid.uuid4()
    purified = job_types.PurifiedModel(
        artifact_id=artifact_id, storage_key=f"orgs/x/artifacts/{artifact_id}", size=123, sha256="a" * 64
    )
    with session_scope(session_factory) as session:
        assert lifecycle.succeed(session=session, job_id=job_id, worker=W2, result={}, purified=purified) is None
    with session_scope(session_factory) as session:
        artifact = lifecycle.succeed(
            session=session, job_id=job_id, worker=W1, result={"der": 0.9}, purified=purified, now=NOW
        )
        assert artifact is not None
    job = _job(session_factory, job_id)
    assert (job.status, job.result, job.purified_model_id, job.finished_at) == (
        "succeeded",
        {"der": 0.9},
        artifact_id,
        NOW,
    )
    with session_scope(session_factory) as session:
        row = session.get(Artifact, artifact_id)
        assert (row.kind, row.org_id, row.size, row.sha256) == ("purified_model", job.org_id, 123, "a" * 64)
        assert row.meta["job_id"] == str(job_id)
    # a terminal job is never changed again
    with session_scope(session_factory) as session:
        assert not lifecycle.fail(session=session, job_id=job_id, error=job_errors.internal_error(RuntimeError("x")))
        assert not lifecycle.cancelled(session=session, job_id=job_id)
    assert _job(session_factory, job_id).status == "succeeded"


def test_fail_tells_bad_input_from_internal_faults(session_factory, make_job):
    bad = job_errors.input_error(ModelLoadError("missing key conv1.weight"))
    assert bad == {
        "type": "invalid-input",
        "title": "Invalid input",
        "detail": "missing key conv1.weight",
        "code": "model-mismatch",
    }
    internal = job_errors.internal_error(KeyError("secret/path/in/trace"))
    assert internal["type"] == "internal-error" and internal["code"] == "internal"
    assert "KeyError" in internal["detail"] and "secret/path" not in internal["detail"]

    job_id = make_job()
    _claim(session_factory, job_id)
    with session_scope(session_factory) as session:
        assert not lifecycle.fail(session=session, job_id=job_id, error=bad, worker=W2)
        assert lifecycle.fail(session=session, job_id=job_id, error=bad, worker=W1, now=NOW)
    job = _job(session_factory, job_id)
    assert (job.status, job.error, job.finished_at) == ("failed", bad, NOW)
    assert [e.status for e in _events(session_factory, job_id)] == ["running", "failed"]


def test_cancel_flag_and_ownership_are_read_together(session_factory, make_job):
    job_id = make_job()
    _claim(session_factory, job_id)
    with session_scope(session_factory) as session:
        assert job_queries.job_control(session=session, job_id=job_id, worker=W1) == job_queries.JobControl(False, True)
        assert job_queries.job_control(session=session, job_id=job_id, worker=W2) == job_queries.JobControl(
            False, False
        )
        session.get(Job, job_id).cancel_requested = True
    with session_scope(session_factory) as session:
        assert job_queries.cancel_requested(session=session, job_id=job_id)
        assert lifecycle.cancelled(session=session, job_id=job_id, worker=W1)
    assert _job(session_factory, job_id).status == "cancelled"


def test_release_puts_a_running_job_back_in_the_queue(session_factory, make_job):
    job_id = make_job()
    _claim(session_factory, job_id)
    with session_scope(session_factory) as session:
        assert not lifecycle.release(session=session, job_id=job_id, worker=W2, reason="x")
        assert lifecycle.release(session=session, job_id=job_id, worker=W1, reason="database hiccup")
    job = _job(session_factory, job_id)
    assert (job.status, job.worker, job.attempts) == ("queued", None, 1)


def _reap(factory, *, now, policy=None, resend_limit=None) -> job_types.ReapReport:
    policy = policy or job_types.ReapPolicy(stale_after_s=60, queued_after_s=300, max_attempts=2, time_limit_s=3600)
    with session_scope(factory) as session:
        return lifecycle.reap(session=session, policy=policy, resend_limit=resend_limit, now=now)


def test_reaper_requeues_once_then_fails_lost_jobs(session_factory, make_job):
    # far in the future, so rows of other tests never qualify as "stale" here
    now = datetime(2100, 1, 1, tzinfo=UTC)
    stale = now - timedelta(seconds=61)
    started = now - timedelta(seconds=600)
    first = make_job(status="running", attempts=1, worker=W1, heartbeat_at=stale, started_at=started)
    second = make_job(status="running", attempts=2, worker=W1, heartbeat_at=stale, started_at=started)
    wanted_cancel = make_job(
        status="running", attempts=1, worker=W1, heartbeat_at=stale, started_at=started, cancel_requested=True
    )
    too_long = make_job(
        status="running", attempts=1, worker=W1, heartbeat_at=stale, started_at=now - timedelta(hours=2)
    )
    alive = make_job(
        status="running", attempts=1, worker=W1, heartbeat_at=now - timedelta(seconds=5), started_at=started
    )

    report = _reap(session_factory, now=now)
    assert set(report.requeued) >= {first} and second not in report.requeued
    assert {second, too_long} <= set(report.failed)
    assert wanted_cancel in report.cancelled
    assert alive not in report.requeued + report.failed + report.cancelled
    assert first in report.to_enqueue

    assert (_job(session_factory, first).status, _job(session_factory, first).worker) == ("queued", None)
    lost = _job(session_factory, second)
    assert lost.status == "failed" and lost.error["type"] == "worker-lost"
    assert _job(session_factory, too_long).error["type"] == "time-limit"
    assert _job(session_factory, wanted_cancel).status == "cancelled"
    assert _job(session_factory, alive).status == "running"


def test_reaper_resends_forgotten_queued_jobs_once_per_threshold(session_factory, make_job):
    now = datetime(2101, 1, 1, tzinfo=UTC)
    old = make_job(created_at=now - timedelta(seconds=301))
    fresh = make_job(created_at=now - timedelta(seconds=10))
    report = _reap(session_factory, now=now)
    assert old in report.resend and fresh not in report.resend
    # sent again a minute later? no: the last (re-)enqueue is recent
    assert old not in _reap(session_factory, now=now + timedelta(seconds=60)).resend
    # a threshold later, it is sent again
    assert old in _reap(session_factory, now=now + timedelta(seconds=302)).resend
    # the broker already holds enough messages: nothing resent
    assert _reap(session_factory, now=now + timedelta(seconds=700), resend_limit=0).resend == []
    messages = [e.message for e in _events(session_factory, old)]
    assert len(messages) == 2 and all(m.startswith("re-queued") for m in messages)


def test_reap_policy_validates():
    with pytest.raises(ValueError):
        job_types.ReapPolicy(stale_after_s=0, queued_after_s=1, max_attempts=1)
    with pytest.raises(ValueError):
        job_types.ReapPolicy(stale_after_s=1, queued_after_s=1, max_attempts=0)
