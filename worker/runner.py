"""Run one purification job: claim it, load its inputs from the store, call the
engine with a progress reporter and a cancel hook, persist the outcome.

Kept apart from Celery so the same code runs in a test without a broker; the
task in :mod:`worker.tasks` is a thin wrapper around :meth:`JobRunner.run`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy.orm import Session, sessionmaker

from api.core.db import session_scope
from api.core.models import Artifact, Job
from api.core.services import runs
from api.core.settings import Settings
from api.core.store import artifact_key
from defense_core.errors import Cancelled, InputError
from worker.runtime import WorkerDevice

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5


class JobLost(Exception):
    """This worker no longer owns the job (the reaper gave it to another, or it ended)."""


class ChildOutputError(RuntimeError):
    """The contained child's outputs are missing or do not match what it reported."""


def worker_identity() -> str:
    """``host:pid`` — unique per pool process, and checkable for liveness on this host."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """False only when ``owner`` is a process on THIS host that no longer exists."""
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # our own earlier delivery: it is not running any more
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class JobChannel:
    """The running job's link to its row: throttled progress, heartbeat, cancel flag.

    The engine calls :meth:`update` (as its ``Reporter``) and :meth:`should_stop`
    (as its cancel hook) from the computing thread; a daemon thread refreshes
    the heartbeat, so a long step never makes a live job look lost.
    """

    session_factory: sessionmaker[Session]
    job_id: uuid.UUID
    worker: str
    progress_interval_s: float
    heartbeat_interval_s: float
    cancel_poll_s: float = CANCEL_POLL_S
    lost: threading.Event = field(default_factory=threading.Event)
    cancel_seen: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _throttle: runs.ProgressThrottle | None = None
    _last_poll: float = -1e18
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._throttle = runs.ProgressThrottle(interval_s=self.progress_interval_s)

    # Reporter protocol
    def update(
        self, *, stage: str, step: int, total: int | None, metrics: Mapping[str, float] | None = None
    ) -> None:
        assert self._throttle is not None
        if not self._throttle.should_write(stage=stage, step=step, total=total, at=time.monotonic()):
            return
        with session_scope(self.session_factory) as session:
            owned = runs.record_progress(
                session=session, job_id=self.job_id, worker=self.worker,
                stage=stage, step=step, total=total, metrics=metrics,
            )
        if not owned:
            self.lost.set()

    # CancelHook
    def should_stop(self) -> bool:
        if self.lost.is_set() or self.cancel_seen.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll < self.cancel_poll_s:
            return False
        self._last_poll = now
        with session_scope(self.session_factory) as session:
            control = runs.job_control(session=session, job_id=self.job_id, worker=self.worker)
        if not control.owned:
            self.lost.set()
        if control.cancel_requested:
            self.cancel_seen.set()
        return self.lost.is_set() or self.cancel_seen.is_set()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                with session_scope(self.session_factory) as session:
                    owned = runs.heartbeat(session=session, job_id=self.job_id, worker=self.worker)
            except Exception:  # a transient database error: try again next tick
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
                continue
            if not owned:
                self.lost.set()
                return


def _artifact(session: Session, artifact_id: uuid.UUID | None, *, org_id: uuid.UUID) -> Artifact | None:
    if artifact_id is None:
        return None
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.org_id != org_id:
        raise InputError(f"artifact {artifact_id} no longer exists")
    return artifact


@dataclass(frozen=True)
class JobSnapshot:
    """The job's inputs as plain values, read once after the claim."""

    org_id: uuid.UUID
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
    job = session.get(Job, job_id)
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


MAX_MODE_CACHE_BYTES = 1 << 20


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


@dataclass
class JobRunner:
    """Everything one worker process needs to run jobs (built once per process)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: Any  # api.core.store.ArtifactStore
    runtime: WorkerDevice
    worker: str = field(default_factory=worker_identity)

    def claim(self, job_id: uuid.UUID) -> runs.Claim:
        with session_scope(self.session_factory) as session:
            return runs.claim(
                session=session,
                job_id=job_id,
                worker=self.worker,
                stale_after_s=self.settings.heartbeat_stale_s,
                max_attempts=self.settings.job_max_attempts,
                owner_alive=owner_alive,
            )

    def run(self, job_id: uuid.UUID) -> str:
        """Run the job to a terminal state; returns what happened (for logs and tests).

        Infrastructure errors (database, store unreachable) propagate so the task
        can retry; everything else ends the job.
        """
        claim = self.claim(job_id)
        if claim.outcome is not runs.ClaimOutcome.CLAIMED:
            log.info("job %s not run: %s", job_id, claim.outcome.value)
            return claim.outcome.value
        log.info("job %s: attempt %d on %s", job_id, claim.attempt, self.worker)
        channel = JobChannel(
            session_factory=self.session_factory,
            job_id=job_id,
            worker=self.worker,
            progress_interval_s=self.settings.progress_interval_s,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )
        channel.start_heartbeat()
        try:
            return self._run_claimed(job_id, channel)
        finally:
            channel.stop_heartbeat()

    def _run_claimed(self, job_id: uuid.UUID, channel: JobChannel) -> str:
        from celery.exceptions import SoftTimeLimitExceeded

        from defense_core.sandbox import ChildFailed, ResourceLimitError

        scratch_root = self.settings.scratch_path
        try:
            scratch = prepare_scratch(scratch_root, job_id)
            try:
                with session_scope(self.session_factory) as session:
                    snap = snapshot(session, job_id)
                channel.update(stage="loading", step=0, total=None)
                names = fetch_inputs(snap, store=self.store, scratch=scratch)
                if channel.should_stop():
                    raise Cancelled("cancelled while loading")
                return self._purify_and_store(job_id, snap, names, channel, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        except Cancelled:
            return self._stopped(job_id, channel)
        except JobLost:
            log.warning("job %s: no longer owned by %s; stopping without writing", job_id, self.worker)
            return "lost"
        except ResourceLimitError as exc:
            log.info("job %s stopped at its %s bound: %s", job_id, exc.bound, exc)
            if exc.bound == "time":
                self._fail(job_id, runs.time_limit_error(limit_s=self.settings.job_soft_time_limit_s))
            else:
                self._fail(job_id, runs.input_error(exc))
            return "failed"
        except InputError as exc:
            log.info("job %s failed on bad input: %s", job_id, exc)
            self._fail(job_id, runs.input_error(exc))
            return "failed"
        except SoftTimeLimitExceeded:
            self._fail(job_id, runs.time_limit_error(limit_s=self.settings.job_soft_time_limit_s))
            return "failed"
        except ChildFailed as exc:
            log.error("job %s failed in its contained child: %s", job_id, exc)
            self._fail(job_id, runs.internal_error(exc))
            return "failed"
        except Exception as exc:
            if is_transient(exc):
                self._release(job_id, exc)
                raise
            log.exception("job %s failed with an internal error", job_id)
            self._fail(job_id, runs.internal_error(exc))
            return "failed"

    def _contained_purify(self, job_id: uuid.UUID, snap: JobSnapshot, names: Mapping[str, str | None],
                          channel: JobChannel, scratch: Path) -> dict[str, Any]:
        """Run the engine on the job in a contained child; the Result document it returns."""
        from defense_core.jobs.request import PurifyRequest
        from defense_core.sandbox import Limits, run_contained, shared_pool
        from defense_core.sandbox.confine import gpu_device_paths

        _copy_mode_cache_in(self.settings, scratch)
        device = {"device": self.runtime.device, "threads": self.runtime.threads,
                  "mode_cache": "cpu-modes.json"}
        request = PurifyRequest(**names, trigger=snap.trigger, defense=snap.defense,
                                params=snap.params, spec=snap.spec)
        args = {
            **request.to_dict(),
            "device": device,
            "out": "out/purified.safetensors",
            "metadata": {"job_id": str(job_id), "source_sha256": snap.model_sha256},
        }
        limits = Limits(
            wall_seconds=float(self.settings.job_soft_time_limit_s),
            memory_bytes=self.settings.job_memory_bytes,
            file_bytes=max(4 * self.settings.max_model_bytes, 1 << 30),
            threads=self.runtime.threads,
        )
        pool = shared_pool(spares=self.settings.sandbox_spares, threads=self.runtime.threads)
        devices = gpu_device_paths() if self.runtime.device.startswith("cuda") else ()
        outcome = run_contained("purify", args, scratch=scratch, limits=limits, reporter=channel,
                                should_stop=channel.should_stop, devices=devices, pool=pool)
        log.info("job %s: contained run took %.1f s, peak memory %.0f MiB", job_id, outcome.seconds,
                 outcome.peak_rss_bytes / 2**20)
        _copy_mode_cache_out(self.settings, scratch)
        return outcome.result

    def _purify_and_store(
        self, job_id: uuid.UUID, snap: JobSnapshot, names: Mapping[str, str | None], channel: JobChannel,
        scratch: Path,
    ) -> str:
        from defense_core.spec import ModelSpec

        document = self._contained_purify(job_id, snap, names, channel, scratch)
        if channel.should_stop():
            raise Cancelled("cancelled after the defense finished")
        out_path = scratch / "out" / "purified.safetensors"
        if not out_path.is_file() or out_path.is_symlink():
            raise ChildOutputError("the contained run wrote no purified model")
        sha256 = document.get("model_sha256")
        artifact_id = uuid.uuid4()
        key = artifact_key(org_id=snap.org_id, artifact_id=artifact_id, suffix=".safetensors")
        stored = self.store.put_file(key, out_path)
        if stored.sha256 != sha256:
            self.store.delete(key)
            raise ChildOutputError("the stored purified model does not match the digest the run reported")
        spec = ModelSpec.from_dict(snap.spec)
        purified = runs.PurifiedModel(
            artifact_id=artifact_id,
            storage_key=key,
            size=stored.size,
            sha256=stored.sha256,
            filename=f"purified-{job_id}.safetensors",
            meta={"spec": spec.to_dict(), "source_sha256": snap.model_sha256},
        )
        try:
            with session_scope(self.session_factory) as session:
                artifact = runs.succeed(
                    session=session, job_id=job_id, worker=self.worker, result=document, purified=purified
                )
        except BaseException:
            self.store.delete(key)
            raise
        if artifact is None:
            self.store.delete(key)
            raise JobLost(f"job {job_id} changed hands before its result was saved")
        log.info("job %s succeeded (purified model %s)", job_id, artifact.id)
        return "succeeded"

    def _stopped(self, job_id: uuid.UUID, channel: JobChannel) -> str:
        if channel.lost.is_set() and not channel.cancel_seen.is_set():
            log.warning("job %s: ownership lost; stopping", job_id)
            return "lost"
        with session_scope(self.session_factory) as session:
            runs.cancelled(session=session, job_id=job_id, worker=self.worker)
        log.info("job %s cancelled", job_id)
        return "cancelled"

    def _fail(self, job_id: uuid.UUID, error: dict[str, str]) -> None:
        with session_scope(self.session_factory) as session:
            runs.fail(session=session, job_id=job_id, error=error, worker=self.worker)

    def _release(self, job_id: uuid.UUID, exc: BaseException) -> None:
        try:
            with session_scope(self.session_factory) as session:
                runs.release(session=session, job_id=job_id, worker=self.worker,
                             reason=f"transient error ({type(exc).__name__}), retrying")
        except Exception:  # the database itself is down: the reaper re-queues later
            log.warning("could not release job %s", job_id, exc_info=True)

    def fail_internal(self, job_id: uuid.UUID, exc: BaseException) -> None:
        """Give up after retries: fail the job if it is still ours or queued."""
        with session_scope(self.session_factory) as session:
            runs.fail(session=session, job_id=job_id, error=runs.internal_error(exc))


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying the task for: the database or the store is unreachable."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from api.core.errors import ServiceUnavailable

    errors: list[type[BaseException]] = [OperationalError, InterfaceError, ServiceUnavailable, ConnectionError]
    try:
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

        errors += [EndpointConnectionError, ConnectionClosedError]
    except ImportError:  # pragma: no cover - boto3 is a dependency
        pass
    return tuple(errors)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, transient_errors())
