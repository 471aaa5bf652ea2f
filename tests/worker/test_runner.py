"""The job runner and the reaper in-process, on PostgreSQL with a local store and
the filesystem broker: the failure paths the end-to-end tests do not reach."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api.core.db import session_scope
from api.core.errors import ServiceUnavailable
from api.core.models import Artifact, Job, utcnow
from api.core.queue import make_celery, queue_depth
from api.core.services.job_types import ReapPolicy
from api.core.settings import Settings
from api.core.store import LocalStore
from worker.channel import owner_alive
from worker.reaper import ReaperConfig, reap_once
from worker.runner import JobRunner
from worker.runtime import WorkerDevice

pytestmark = pytest.mark.postgres

SPEC = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "input_size": [16, 16]}


def _settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path, database_url=database_url, heartbeat_interval_s=0.2, heartbeat_stale_s=2)


def _runner(settings: Settings, factory: sessionmaker[Session], store: object) -> JobRunner:
    return JobRunner(settings=settings, session_factory=factory, store=store,
                     runtime=WorkerDevice("cpu", 1, False), worker="test-host:1")


def _put_inputs(factory: sessionmaker[Session], store: LocalStore, job_id: uuid.UUID, *, model_bytes: bytes) -> None:
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        model = session.get(Artifact, job.model_id)
        model.meta = {"spec": SPEC}
        store.put_stream(model.storage_key, [model_bytes])
        clean = session.get(Artifact, job.clean_dataset_id)
        store.put_stream(clean.storage_key, [b"not an npz"])


def test_bad_input_fails_the_job_with_the_engines_reason(tmp_path, postgres_url, session_factory, make_job):
    settings = _settings(tmp_path, postgres_url)
    store = LocalStore(tmp_path / "store")
    job_id = make_job()
    _put_inputs(session_factory, store, job_id, model_bytes=b"\x00" * 64)
    assert _runner(settings, session_factory, store).run(job_id) == "failed"
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and job.attempts == 1
        assert job.error["type"] == "invalid-input" and job.error["title"] == "Invalid input"
        assert job.error["code"] != "internal" and job.error["detail"]
    # a second delivery of the same message is a no-op
    assert _runner(settings, session_factory, store).run(job_id) == "terminal"


def test_a_store_outage_is_retried_not_failed(tmp_path, postgres_url, session_factory, make_job):
    class DownStore:
        def download_to(self, key: str, path: object) -> None:
            raise ServiceUnavailable("store: connection refused")

    settings = _settings(tmp_path, postgres_url)
    job_id = make_job()
    with session_scope(session_factory) as session:
        session.get(Artifact, session.get(Job, job_id).model_id).meta = {"spec": SPEC}
    with pytest.raises(ServiceUnavailable):
        _runner(settings, session_factory, DownStore()).run(job_id)
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        # back in the queue for the task's retry, the attempt counted
        assert (job.status, job.worker, job.attempts, job.error) == ("queued", None, 1, None)


def test_owner_liveness_is_only_judged_on_this_host():
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert owner_alive(f"{host}:{os.getppid()}") is True
    assert owner_alive(f"{host}:{dead.pid}") is False
    assert owner_alive(f"{host}:{os.getpid()}") is False  # our own earlier delivery
    assert owner_alive(f"elsewhere-{host}:{dead.pid}") is True  # cannot tell: trust the heartbeat
    assert owner_alive("garbage") is True


def test_reaper_requeues_a_lost_job_and_sends_its_message(tmp_path, postgres_url, session_factory, make_job):
    settings = _settings(tmp_path, postgres_url)
    app = make_celery(settings)
    long_ago = utcnow() - timedelta(minutes=5)
    job_id = make_job(status="running", attempts=1, worker="gone:1", heartbeat_at=long_ago, started_at=long_ago)
    # queued jobs of other tests are never "forgotten" here; no time limit
    policy = ReapPolicy(stale_after_s=2, queued_after_s=10 * 365 * 86400, max_attempts=2)
    config = ReaperConfig(interval_s=1, policy=policy)
    report = reap_once(settings=settings, session_factory=session_factory, celery_app=app, config=config)
    assert job_id in report.requeued
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        assert job.status == "queued" and job.task_id is not None
    assert queue_depth(app) == len(report.to_enqueue) >= 1


def test_reaper_timing_follows_the_heartbeat_settings(tmp_path):
    config = ReaperConfig.from_settings(Settings(data_dir=tmp_path, heartbeat_interval_s=10, heartbeat_stale_s=120))
    assert config.interval_s == 30 and config.policy.stale_after_s == 120
    assert config.policy.queued_after_s == 240 and config.policy.max_attempts == 2
    fast = ReaperConfig.from_settings(Settings(data_dir=tmp_path, heartbeat_interval_s=0.5, heartbeat_stale_s=3))
    assert fast.interval_s == 0.75


def test_jobs_remember_the_cpu_mode_in_the_hosts_cache_file(tmp_path):
    """The child learns CPU modes in its scratch copy; the worker keeps what it wrote."""
    import json

    from worker.staging import _copy_mode_cache_in, _copy_mode_cache_out

    for settings, where in ((Settings(data_dir=tmp_path / "var"), tmp_path / "var" / "cpu-modes.json"),
                            (Settings(data_dir=tmp_path / "var", cpu_mode_cache=tmp_path / "modes.json"),
                             tmp_path / "modes.json")):
        scratch = tmp_path / f"scratch-{where.name}"
        scratch.mkdir()
        _copy_mode_cache_in(settings, scratch)
        assert not (scratch / "cpu-modes.json").exists()  # nothing learned yet
        (scratch / "cpu-modes.json").write_text(json.dumps({"small_cnn|1x16x16": "fp32"}))
        _copy_mode_cache_out(settings, scratch)
        assert json.loads(where.read_text()) == {"small_cnn|1x16x16": "fp32"}
        other = tmp_path / f"next-{where.name}"
        other.mkdir()
        _copy_mode_cache_in(settings, other)  # the next job starts from it
        assert (other / "cpu-modes.json").read_text() == where.read_text()
        (other / "cpu-modes.json").write_text("[not an object")  # a broken write is not kept
        _copy_mode_cache_out(settings, other)
        assert json.loads(where.read_text()) == {"small_cnn|1x16x16": "fp32"}
