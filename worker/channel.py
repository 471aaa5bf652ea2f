"""A running job's link to its row: who owns it, throttled progress, the heartbeat and
the cancel flag. The transitions themselves are :mod:`api.core.services.lifecycle`."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from api.core.db import session_scope
from api.core.services import job_queries, lifecycle

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5


class JobLost(Exception):
    """This worker no longer owns the job (the reaper gave it to another, or it ended)."""


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
class ProgressThrottle:
    """At most one progress write per ``interval_s``, except that a stage change
    and a stage's last step are always written."""

    interval_s: float = 1.0
    _last_stage: str | None = None
    _last_at: float = -math.inf

    def should_write(self, *, stage: str, step: int, total: int | None, at: float) -> bool:
        due = (
            stage != self._last_stage
            or (total is not None and step >= total)
            or at - self._last_at >= self.interval_s
        )
        if due:
            self._last_stage = stage
            self._last_at = at
        return due


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
    _throttle: ProgressThrottle | None = None
    _last_poll: float = -1e18
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._throttle = ProgressThrottle(interval_s=self.progress_interval_s)

    # Reporter protocol
    def update(self, *, stage: str, step: int, total: int | None,
               metrics: Mapping[str, float] | None = None) -> None:
        assert self._throttle is not None
        now = time.monotonic()
        if not self._throttle.should_write(stage=stage, step=step, total=total, at=now):
            return
        with session_scope(self.session_factory) as session:
            owned = lifecycle.record_progress(
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
            control = job_queries.job_control(session=session, job_id=self.job_id,
                                              worker=self.worker)
        if not control.owned:
            self.lost.set()
        if control.cancel_requested:
            self.cancel_seen.set()
        return self.lost.is_set() or self.cancel_seen.is_set()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}",
                                        daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                with session_scope(self.session_factory) as session:
                    owned = lifecycle.heartbeat(session=session, job_id=self.job_id,
                                                worker=self.worker)
            except Exception:  # a transient database error: try again next tick
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
                continue
            if not owned:
                self.lost.set()
                return
