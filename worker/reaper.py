"""The reaper: a job is never left ``running`` forever, nor ``queued`` without a message.

Runs as a daemon thread in every worker's main process (several reapers on
several hosts are fine: stale running jobs are locked with SKIP LOCKED, and a
duplicate message for a queued job is a no-op for the idempotent task).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from api.core import scratch
from api.core.db import session_scope
from api.core.queue import enqueue_purify, queue_depth
from api.core.services import job_queries, lifecycle
from api.core.services.job_types import ReapPolicy, ReapReport
from api.core.settings import Settings

log = logging.getLogger(__name__)

MIN_QUEUED_AFTER_S = 60.0
MAX_INTERVAL_S = 30.0
MIN_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ReaperConfig:
    interval_s: float
    policy: ReapPolicy

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")

    @classmethod
    def from_settings(cls, settings: Settings) -> ReaperConfig:
        stale = settings.heartbeat_stale_s
        return cls(
            interval_s=min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, stale / 4)),
            policy=ReapPolicy(
                stale_after_s=stale,
                queued_after_s=max(MIN_QUEUED_AFTER_S, 2 * stale),
                max_attempts=settings.job_max_attempts,
                time_limit_s=float(settings.job_time_limit_s),
            ),
        )


def reap_once(
    *, settings: Settings, session_factory: sessionmaker[Session], celery_app: Celery, config: ReaperConfig
) -> ReapReport:
    """One pass: fix rows, commit, then send the jobs that need a message."""
    with session_scope(session_factory) as session:
        queued = job_queries.count_queued(session=session)
    depth = queue_depth(celery_app) if queued else 0
    # Messages already waiting cover that many queued jobs; resend only the rest.
    resend_limit = None if depth is None else max(0, queued - depth)
    with session_scope(session_factory) as session:
        report = lifecycle.reap(session=session, policy=config.policy, resend_limit=resend_limit)
    for job_id in report.to_enqueue:
        task_id = enqueue_purify(settings=settings, job_id=job_id, app=celery_app)
        with session_scope(session_factory) as session:
            lifecycle.record_task_id(session=session, job_id=job_id, task_id=task_id)
    try:
        from worker.channel import owner_alive, worker_identity

        me = worker_identity()  # a job of this very process (a solo pool) is alive
        scratch.sweep(settings=settings, session_factory=session_factory,
                      owner_alive=lambda owner: owner == me or owner_alive(owner))
    except OSError:
        log.warning("reaper: could not sweep the scratch folder", exc_info=True)
    if report.to_enqueue or report.failed or report.cancelled:
        log.warning(
            "reaper: re-queued %d, resent %d, failed %d, cancelled %d",
            len(report.requeued), len(report.resend), len(report.failed), len(report.cancelled),
        )
    return report


class ReaperThread:
    """Calls :func:`reap_once` every ``config.interval_s`` until stopped."""

    def __init__(
        self, *, settings: Settings, session_factory: sessionmaker[Session], celery_app: Celery,
        config: ReaperConfig | None = None,
    ) -> None:
        self._settings = settings
        self._session_factory = session_factory
        self._celery_app = celery_app
        self._config = config or ReaperConfig.from_settings(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cleanroom-reaper", daemon=True)

    def start(self) -> None:
        log.info("reaper started (every %.1f s, %s)", self._config.interval_s, self._config.policy)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self._config.interval_s):
            try:
                reap_once(
                    settings=self._settings, session_factory=self._session_factory,
                    celery_app=self._celery_app, config=self._config,
                )
            except Exception:  # database or broker briefly down: try again next tick
                log.warning("reaper pass failed", exc_info=True)
