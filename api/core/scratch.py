"""Left-overs of killed processes: scratch directories and staged uploads.

A job's scratch directory (``<scratch>/<job id>``) holds a tenant's model and
datasets while the job runs; an upload's (``<scratch>/upload-<hex>``) holds the
model being validated; ``<data_dir>/uploads/*.part`` are uploads being received.
The process that made them removes them when it is done, but a SIGKILL (the
Celery hard time limit, the OOM killer, a host reboot) leaves them behind, so:

* the next attempt of a job empties its directory before it starts
  (``worker.staging.prepare_scratch``);
* :func:`sweep` — run by every reaper pass and at API start — removes job
  directories whose job is no longer running on a live process of this host,
  and upload directories and staged files older than their bound.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from api.core.db import session_scope
from api.core.repositories import JobRepository
from api.core.settings import Settings

log = logging.getLogger(__name__)

UPLOAD_PREFIX = "upload-"
STAGED_SUFFIX = ".part"
# A staged upload still being written has a fresh mtime; one this old is abandoned.
STAGED_MAX_AGE_S = 3600.0


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.removed)


def _remove(path: Path, report: SweepReport) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    report.removed.append(path.name)


def sweep(
    *,
    settings: Settings,
    session_factory: sessionmaker[Session] | None,
    owner_alive: Callable[[str], bool] | None = None,
    now: float | None = None,
) -> SweepReport:
    """Remove what no live process on this host can still be using.

    Without a ``session_factory`` (the API, which runs no jobs) job directories
    are left to the workers' reapers.
    """
    now = time.time() if now is None else now
    report = SweepReport()
    upload_bound = settings.model_validation_timeout_s + 300.0
    root = settings.scratch_path
    job_dirs: dict[uuid.UUID, Path] = {}
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(UPLOAD_PREFIX):
                if now - _mtime(entry, now) > upload_bound:
                    _remove(entry, report)
                continue
            try:
                job_dirs[uuid.UUID(entry.name)] = entry
            except ValueError:
                continue  # not ours
    if job_dirs and session_factory is not None:
        with session_scope(session_factory) as session:
            rows = JobRepository(session).owners(job_dirs)
        running = {
            row.id for row in rows
            if row.status == "running" and (owner_alive is None or row.worker is None or owner_alive(row.worker))
        }
        for job_id, path in job_dirs.items():
            if job_id not in running:
                _remove(path, report)
    staging = settings.data_dir / "uploads"
    if staging.is_dir():
        for entry in staging.glob(f"*{STAGED_SUFFIX}"):
            if now - _mtime(entry, now) > STAGED_MAX_AGE_S:
                _remove(entry, report)
    if report:
        log.warning("removed %d left-over scratch entries: %s", len(report.removed), ", ".join(report.removed[:10]))
    return report


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return default
