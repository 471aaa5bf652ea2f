"""The task queue seen from the service layer: the Celery app factory and
enqueue/revoke by task NAME (the API never imports the worker's task code).

The broker carries only job ids; the database is the source of truth, so the
result backend is disabled and every task is idempotent.

Two transports:

* production: Redis (``BROKER_URL=redis://...``), with a visibility timeout
  longer than the longest allowed job so a running job is never re-delivered
  while its worker is alive, and late acks so a job whose worker died is;
* embedded: kombu's filesystem transport (``filesystem://`` or
  ``filesystem:///some/dir``; messages are files under the broker folder).
  One machine only, no remote control (so no revoke broadcast: cancellation
  relies on the job's cancel flag in the database), polling latency of about
  half a second, and a message taken by a worker that is then killed is lost —
  the reaper re-enqueues such jobs from the database.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from celery import Celery

if TYPE_CHECKING:
    from api.core.settings import Settings

log = logging.getLogger(__name__)

PURIFY_TASK = "cleanroom.purify"
QUEUE_NAME = "cleanroom"
# How much longer than the hard time limit a Redis message stays invisible
# before the broker hands it to another worker.
VISIBILITY_MARGIN_S = 600
FILESYSTEM_POLL_S = 0.5
MAX_TASKS_PER_CHILD = 50


@dataclass(frozen=True)
class BrokerLayout:
    """Where the embedded transport keeps its messages."""

    root: Path

    @property
    def queue_folder(self) -> Path:
        return self.root / "queue"

    @property
    def processed_folder(self) -> Path:
        return self.root / "processed"

    @property
    def control_folder(self) -> Path:
        return self.root / "control"

    def create(self) -> None:
        for folder in (self.queue_folder, self.processed_folder, self.control_folder):
            folder.mkdir(parents=True, exist_ok=True)


def is_filesystem_broker(broker_url: str) -> bool:
    return urlsplit(broker_url).scheme == "filesystem"


def filesystem_layout(settings: Settings) -> BrokerLayout:
    """``filesystem:///abs/dir`` names the folder; bare ``filesystem://`` means ``settings.broker_folder``."""
    path = urlsplit(settings.broker_url).path
    root = Path(path) if path not in ("", "/") else Path(settings.broker_folder)
    return BrokerLayout(root=root.expanduser().resolve())


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting the service relies on, in one place (and testable)."""
    soft_limit = int(settings.job_soft_time_limit_s)
    hard_limit = int(settings.job_time_limit_s)
    config: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": soft_limit,
        "task_time_limit": hard_limit,
        "worker_max_tasks_per_child": MAX_TASKS_PER_CHILD,
        "worker_concurrency": int(settings.worker_concurrency),
        "task_default_queue": QUEUE_NAME,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
        "timezone": "UTC",
    }
    if is_filesystem_broker(settings.broker_url):
        layout = filesystem_layout(settings)
        config.update(
            broker_url="filesystem://",
            broker_transport_options={
                # one folder serves as both "in" and "out": producer and worker share it
                "data_folder_in": str(layout.queue_folder),
                "data_folder_out": str(layout.queue_folder),
                "processed_folder": str(layout.processed_folder),
                "control_folder": str(layout.control_folder),
                "store_processed": False,
                "polling_interval": FILESYSTEM_POLL_S,
            },
            # no broadcast: stale pidbox queues of dead workers would pile up as files
            worker_enable_remote_control=False,
        )
    else:
        config.update(
            broker_url=settings.broker_url,
            broker_transport_options={"visibility_timeout": hard_limit + VISIBILITY_MARGIN_S},
        )
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (used by the API to send, by the worker to run)."""
    config = celery_config(settings)
    if is_filesystem_broker(settings.broker_url):
        filesystem_layout(settings).create()
    app = Celery("cleanroom", set_as_current=False)
    app.conf.update(config)
    return app


@lru_cache(maxsize=8)
def shared_celery(settings: Settings) -> Celery:
    """One producer app (and connection pool) per settings object, reused across requests."""
    return make_celery(settings)


def enqueue_purify(*, settings: Settings, job_id: uuid.UUID | str, app: Celery | None = None) -> str:
    """Send the purify task for ``job_id`` by name; returns the Celery task id.

    Call only after the job row is committed: the worker re-reads it.
    """
    celery_app = app if app is not None else shared_celery(settings)
    task_id = str(uuid.uuid4())
    celery_app.send_task(PURIFY_TASK, args=[str(job_id)], task_id=task_id, queue=QUEUE_NAME)
    log.info("enqueued %s for job %s (task %s)", PURIFY_TASK, job_id, task_id)
    return task_id


def queue_depth(app: Celery) -> int | None:
    """Messages waiting (not yet delivered) in the job queue; None if the broker cannot say."""
    try:
        with app.connection_for_write() as connection:
            ok = connection.default_channel.queue_declare(queue=QUEUE_NAME, passive=True)
            return int(ok.message_count)
    except Exception:
        log.debug("could not read the depth of queue %s", QUEUE_NAME, exc_info=True)
        return None


def revoke(*, settings: Settings, task_id: str | None, app: Celery | None = None) -> bool:
    """Best-effort revoke of a queued/running task. Returns whether a broadcast was sent.

    The cancel flag in the database is what actually stops a job (the worker
    checks it between steps), so a failed or impossible broadcast is harmless.
    The embedded transport has no remote control: nothing is sent there.
    """
    if not task_id or is_filesystem_broker(settings.broker_url):
        return False
    celery_app = app if app is not None else shared_celery(settings)
    try:
        celery_app.control.revoke(task_id)
    except Exception:  # broker down: the DB flag still cancels the job
        log.warning("could not broadcast revoke for task %s", task_id, exc_info=True)
        return False
    return True
