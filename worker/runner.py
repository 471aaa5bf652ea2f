"""Run one purification job: claim it, load its inputs from the store, call the
engine with a progress reporter and a cancel hook, persist the outcome.

Kept apart from Celery so the same code runs in a test without a broker; the
task in :mod:`worker.tasks` is a thin wrapper around :meth:`JobRunner.run`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.core.db import session_scope
from api.core.services import job_errors, lifecycle
from api.core.services.job_types import Claim, ClaimOutcome, PurifiedModel
from api.core.settings import Settings
from api.core.store import artifact_key
from defense_core.errors import Cancelled, InputError
from worker.channel import JobChannel, JobLost, owner_alive, worker_identity
from worker.runtime import WorkerDevice
from worker.staging import (
    JobSnapshot,
    _copy_mode_cache_in,
    _copy_mode_cache_out,
    fetch_inputs,
    prepare_scratch,
    snapshot,
)

log = logging.getLogger(__name__)


class ChildOutputError(RuntimeError):
    """The contained child's outputs are missing or do not match what it reported."""


@dataclass
class JobRunner:
    """Everything one worker process needs to run jobs (built once per process)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: Any  # api.core.store.ArtifactStore
    runtime: WorkerDevice
    worker: str = field(default_factory=worker_identity)

    def claim(self, job_id: uuid.UUID) -> Claim:
        with session_scope(self.session_factory) as session:
            return lifecycle.claim(
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
        if claim.outcome is not ClaimOutcome.CLAIMED:
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
                return self._run_and_store(job_id, snap, names, channel, scratch)
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
                self._fail(job_id, job_errors.time_limit_error(
                    limit_s=self.settings.job_soft_time_limit_s))
            else:
                self._fail(job_id, job_errors.input_error(exc))
            return "failed"
        except InputError as exc:
            log.info("job %s failed on bad input: %s", job_id, exc)
            self._fail(job_id, job_errors.input_error(exc))
            return "failed"
        except SoftTimeLimitExceeded:
            self._fail(job_id, job_errors.time_limit_error(
                limit_s=self.settings.job_soft_time_limit_s))
            return "failed"
        except ChildFailed as exc:
            log.error("job %s failed in its contained child: %s", job_id, exc)
            self._fail(job_id, job_errors.internal_error(exc))
            return "failed"
        except Exception as exc:
            if is_transient(exc):
                self._release(job_id, exc)
                raise
            log.exception("job %s failed with an internal error", job_id)
            self._fail(job_id, job_errors.internal_error(exc))
            return "failed"

    def _contained_run(self, job_id: uuid.UUID, snap: JobSnapshot, names: Mapping[str, str | None],
                       channel: JobChannel, scratch: Path) -> dict[str, Any]:
        """Run the job's kind on its inputs in a contained child; the document it returns."""
        from defense_core.jobs import get_job_kind
        from defense_core.sandbox import Limits, run_contained, shared_pool
        from defense_core.sandbox.confine import gpu_device_paths

        _copy_mode_cache_in(self.settings, scratch)
        device = {"device": self.runtime.device, "threads": self.runtime.threads,
                  "mode_cache": "cpu-modes.json"}
        request = get_job_kind(snap.task).request.from_dict({
            **names, "trigger": snap.trigger, "defense": snap.defense, "params": snap.params,
            "spec": snap.spec})
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
        outcome = run_contained(snap.task, args, scratch=scratch, limits=limits, reporter=channel,
                                should_stop=channel.should_stop, devices=devices, pool=pool)
        log.info("job %s: contained run took %.1f s, peak memory %.0f MiB", job_id, outcome.seconds,
                 outcome.peak_rss_bytes / 2**20)
        _copy_mode_cache_out(self.settings, scratch)
        return outcome.result

    def _run_and_store(
        self, job_id: uuid.UUID, snap: JobSnapshot, names: Mapping[str, str | None], channel: JobChannel,
        scratch: Path,
    ) -> str:
        document = self._contained_run(job_id, snap, names, channel, scratch)
        if channel.should_stop():
            raise Cancelled("cancelled after the engine finished")
        out_path = scratch / "out" / "purified.safetensors"
        sha256 = document.get("model_sha256")
        if sha256 is None and not os.path.lexists(out_path):  # a kind that made no model (screen, a clean intake)
            return self._store_result(job_id, document, purified=None, key=None)
        if not out_path.is_file() or out_path.is_symlink():
            raise ChildOutputError("the contained run wrote no purified model")
        artifact_id = uuid.uuid4()
        key = artifact_key(org_id=snap.org_id, artifact_id=artifact_id, suffix=".safetensors")
        stored = self.store.put_file(key, out_path)
        if stored.sha256 != sha256:
            self.store.delete(key)
            raise ChildOutputError("the stored purified model does not match the digest the run reported")
        from defense_core.spec import ModelSpec

        spec = ModelSpec.from_dict(snap.spec)
        purified = PurifiedModel(
            artifact_id=artifact_id,
            storage_key=key,
            size=stored.size,
            sha256=stored.sha256,
            filename=f"purified-{job_id}.safetensors",
            meta={"spec": spec.to_dict(), "source_sha256": snap.model_sha256},
        )
        return self._store_result(job_id, document, purified=purified, key=key)

    def _store_result(self, job_id: uuid.UUID, document: dict[str, Any], *,
                      purified: PurifiedModel | None, key: str | None) -> str:
        """Record the result (and the stored model, if any) and the job's success; the stored
        object is deleted again when the job changed hands or the write failed."""
        try:
            with session_scope(self.session_factory) as session:
                job = lifecycle.succeed(
                    session=session, job_id=job_id, worker=self.worker, result=document, purified=purified
                )
        except BaseException:
            if key is not None:
                self.store.delete(key)
            raise
        if job is None:
            if key is not None:
                self.store.delete(key)
            raise JobLost(f"job {job_id} changed hands before its result was saved")
        log.info("job %s succeeded (purified model %s)", job_id, purified.artifact_id if purified else None)
        return "succeeded"

    def _stopped(self, job_id: uuid.UUID, channel: JobChannel) -> str:
        if channel.lost.is_set() and not channel.cancel_seen.is_set():
            log.warning("job %s: ownership lost; stopping", job_id)
            return "lost"
        with session_scope(self.session_factory) as session:
            lifecycle.cancelled(session=session, job_id=job_id, worker=self.worker)
        log.info("job %s cancelled", job_id)
        return "cancelled"

    def _fail(self, job_id: uuid.UUID, error: dict[str, str]) -> None:
        with session_scope(self.session_factory) as session:
            lifecycle.fail(session=session, job_id=job_id, error=error, worker=self.worker)

    def _release(self, job_id: uuid.UUID, exc: BaseException) -> None:
        try:
            with session_scope(self.session_factory) as session:
                lifecycle.release(session=session, job_id=job_id, worker=self.worker,
                             reason=f"transient error ({type(exc).__name__}), retrying")
        except Exception:  # the database itself is down: the reaper re-queues later
            log.warning("could not release job %s", job_id, exc_info=True)

    def fail_internal(self, job_id: uuid.UUID, exc: BaseException) -> None:
        """Give up after retries: fail the job if it is still ours or queued."""
        with session_scope(self.session_factory) as session:
            lifecycle.fail(session=session, job_id=job_id, error=job_errors.internal_error(exc))


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
