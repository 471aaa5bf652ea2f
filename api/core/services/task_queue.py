"""The task queue as the job services see it: enqueue a job, revoke its task.

:class:`CeleryTaskQueue` sends by task NAME through :mod:`api.core.queue` (the API never
imports the worker's task code) and builds its Celery app on first use, so importing the
API does not import Celery. Tests pass their own :class:`TaskQueue`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from celery import Celery

    from api.core.settings import Settings

log = logging.getLogger(__name__)


class TaskQueue(Protocol):
    def enqueue_purify(self, job_id: uuid.UUID) -> str: ...

    def revoke(self, task_id: str | None) -> bool: ...


class CeleryTaskQueue:
    """Sends tasks by name through ``api.core.queue`` with one lazily built Celery app."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def _celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                from api.core import queue

                self._app = queue.make_celery(self._settings)
            return self._app

    def warm_up(self) -> None:
        """Build the Celery app and the parts a first send loads lazily (no connection is
        made), so that a served process imports them at start-up (see ``create_app``)."""
        app = self._celery()
        for part in ("loader", "amqp", "events", "tasks", "backend"):
            try:
                getattr(app, part)
            except Exception:  # a broken setting is reported by the first real send
                log.warning("celery warm-up: %s failed", part, exc_info=True)

    def enqueue_purify(self, job_id: uuid.UUID) -> str:
        from api.core import queue

        return queue.enqueue_purify(settings=self._settings, job_id=job_id, app=self._celery())

    def revoke(self, task_id: str | None) -> bool:
        from api.core import queue

        if not task_id:
            return False
        return queue.revoke(settings=self._settings, task_id=task_id, app=self._celery())
