"""What a job's contained run reads and leaves behind: the snapshot of its inputs, its
scratch directory (inputs downloaded into ``in/``, outputs in ``out/``) and the CPU mode
cache the child may refine."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from api.core.models import Artifact
from api.core.repositories import ArtifactRepository, JobRepository
from api.core.settings import Settings
from defense_core.errors import InputError
from worker.channel import JobLost

log = logging.getLogger(__name__)

MAX_MODE_CACHE_BYTES = 1 << 20


def _artifact(session: Session, artifact_id: uuid.UUID | None, *,
              org_id: uuid.UUID) -> Artifact | None:
    if artifact_id is None:
        return None
    artifact = ArtifactRepository(session).get(org_id=org_id, artifact_id=artifact_id)
    if artifact is None:
        raise InputError(f"artifact {artifact_id} no longer exists")
    return artifact


@dataclass(frozen=True)
class JobSnapshot:
    """The job's inputs as plain values, read once after the claim."""

    org_id: uuid.UUID
    task: str
    defense: str
    params: dict[str, Any]
    trigger: dict[str, Any] | None
    spec: dict[str, Any]
    model_key: str
    model_sha256: str
    clean_key: str
    test_key: str | None
    poisoned_key: str | None


def snapshot(session: Session, job_id: uuid.UUID) -> JobSnapshot:
    job = JobRepository(session).get_by_id(job_id)
    if job is None:
        raise JobLost(f"job {job_id} disappeared")
    model = _artifact(session, job.model_id, org_id=job.org_id)
    clean = _artifact(session, job.clean_dataset_id, org_id=job.org_id)
    test = _artifact(session, job.test_dataset_id, org_id=job.org_id)
    poisoned = _artifact(session, job.poisoned_dataset_id, org_id=job.org_id)
    assert model is not None and clean is not None
    spec = (model.meta or {}).get("spec")
    if not isinstance(spec, dict):
        raise InputError("the model artifact carries no architecture spec")
    return JobSnapshot(
        org_id=job.org_id,
        task=job.task,
        defense=job.defense,
        params=dict(job.params or {}),
        trigger=dict(job.trigger) if job.trigger else None,
        spec=spec,
        model_key=model.storage_key,
        model_sha256=model.sha256,
        clean_key=clean.storage_key,
        test_key=test.storage_key if test else None,
        poisoned_key=poisoned.storage_key if poisoned else None,
    )


def prepare_scratch(root: Path, job_id: uuid.UUID) -> Path:
    """The job's scratch directory, empty: what a killed earlier attempt left is removed."""
    scratch = root / str(job_id)
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "in").mkdir(parents=True, mode=0o700)
    (scratch / "out").mkdir(mode=0o700)
    return scratch


def fetch_inputs(snap: JobSnapshot, *, store: Any, scratch: Path) -> dict[str, str | None]:
    """Download the job's files into ``scratch/in``; their names relative to ``scratch``."""
    names: dict[str, str | None] = {}
    for role, key in (("model", snap.model_key), ("clean", snap.clean_key),
                      ("test", snap.test_key), ("poisoned", snap.poisoned_key)):
        if key is None:
            names[role] = None
            continue
        store.download_to(key, scratch / "in" / role)
        names[role] = f"in/{role}"
    return names


def _copy_mode_cache_in(settings: Settings, scratch: Path) -> None:
    source = settings.cpu_mode_cache_path
    try:
        if source.is_file() and source.stat().st_size <= MAX_MODE_CACHE_BYTES:
            shutil.copyfile(source, scratch / "cpu-modes.json")
    except OSError:
        log.warning("could not copy the CPU mode cache %s", source, exc_info=True)


def _copy_mode_cache_out(settings: Settings, scratch: Path) -> None:
    """Keep what the child learned about CPU modes, if it is a small JSON object."""
    written = scratch / "cpu-modes.json"
    try:
        if not written.is_file() or written.stat().st_size > MAX_MODE_CACHE_BYTES:
            return
        if not isinstance(json.loads(written.read_text(encoding="utf-8")), dict):
            return
        target = settings.cpu_mode_cache_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(written, tmp)
        os.replace(tmp, target)
    except (OSError, ValueError):
        log.warning("could not keep the CPU mode cache", exc_info=True)
