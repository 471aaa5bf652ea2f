"""Left-over scratch directories and staged uploads of killed processes are removed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from api.core.scratch import STAGED_MAX_AGE_S, sweep
from api.core.settings import Settings
from worker.channel import owner_alive, worker_identity
from worker.staging import prepare_scratch

pytestmark = pytest.mark.postgres


def _aged(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_the_sweep_removes_what_no_live_process_uses(tmp_path, session_factory, make_job):
    settings = Settings(data_dir=tmp_path / "var")
    root = settings.scratch_path
    finished = make_job(status="succeeded", attempts=1)
    live = make_job(status="running", attempts=1, worker=f"{worker_identity().rpartition(':')[0]}:1")  # init
    dead_host_pid = f"{worker_identity().rpartition(':')[0]}:{2**22 + 7}"  # no such process
    dead = make_job(status="running", attempts=1, worker=dead_host_pid)
    elsewhere = make_job(status="running", attempts=1, worker="other-host:12")
    dirs = {}
    for name, job_id in (("finished", finished), ("live", live), ("dead", dead), ("elsewhere", elsewhere)):
        dirs[name] = prepare_scratch(root, job_id)
        (dirs[name] / "in" / "model").write_bytes(b"a tenant's model")
    unknown = prepare_scratch(root, uuid.uuid4())  # its job row is gone
    (root / "upload-old").mkdir()
    _aged(root / "upload-old", settings.model_validation_timeout_s + 301)
    (root / "upload-new").mkdir()
    staging = settings.data_dir / "uploads"
    staging.mkdir(parents=True)
    (staging / "upload-a.part").write_bytes(b"x")
    _aged(staging / "upload-a.part", STAGED_MAX_AGE_S + 1)
    (staging / "upload-b.part").write_bytes(b"x")

    report = sweep(settings=settings, session_factory=session_factory, owner_alive=owner_alive)

    assert not dirs["finished"].exists() and not dirs["dead"].exists() and not unknown.exists()
    assert dirs["live"].exists() and dirs["elsewhere"].exists()
    assert not (root / "upload-old").exists() and (root / "upload-new").exists()
    assert not (staging / "upload-a.part").exists() and (staging / "upload-b.part").exists()
    assert len(report.removed) == 5


def test_the_api_sweep_leaves_job_directories_to_the_workers(tmp_path):
    settings = Settings(data_dir=tmp_path / "var")
    job_dir = prepare_scratch(settings.scratch_path, uuid.uuid4())
    assert not sweep(settings=settings, session_factory=None)
    assert job_dir.exists()


def test_a_new_attempt_starts_from_an_empty_scratch_directory(tmp_path):
    job_id = uuid.uuid4()
    first = prepare_scratch(tmp_path, job_id)
    (first / "in" / "model").write_bytes(b"left by a killed attempt")
    second = prepare_scratch(tmp_path, job_id)
    assert second == first and list((second / "in").iterdir()) == []
