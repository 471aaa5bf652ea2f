"""FastAPI dependencies as ``Annotated`` aliases.

Everything comes from ``request.app.state`` (filled by ``create_app``), so a
test builds an app with its own :class:`Settings` and gets its own engine,
store and queue; nothing is a module-level global.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.core.auth import authenticate, require_scope
from api.core.errors import Unauthorized
from api.core.models import ApiKey, Organization, utcnow
from api.core.services.job_status import StatusReader
from api.core.services.task_queue import TaskQueue
from api.core.settings import Settings
from api.core.store import ArtifactStore
from api.metrics import ApiMetrics

# The dependencies that do no I/O are ``async def`` so that FastAPI runs them on the
# event loop instead of paying a thread-pool round trip each (status polling is hot).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Creating one does no I/O (connections are taken from
    the pool lazily, inside the sync handlers); closing hands the connection back."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    try:
        yield session
    finally:
        session.close()


async def get_status_reader(request: Request) -> StatusReader:
    return request.app.state.status_reader


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StatusReaderDep = Annotated[StatusReader, Depends(get_status_reader)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]

# auto_error=False: a missing header becomes our own 401 problem, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer cr_...`")


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_KEY_CACHE_TTL_S = 2.0


class KeyCache:
    """API keys authenticated in the last ``ttl_s`` seconds, by SHA-256 of the raw key.

    Status polling is the hot path: the cache saves the key lookup (and a thread-pool
    round trip) on almost every poll. The price is that a revoked key keeps working
    for at most ``ttl_s`` seconds in each API process; an expired key stops at once.
    Failed look-ups are never cached. ``ttl_s = 0`` disables the cache.

    :meth:`resolve` also shares one look-up between the concurrent requests that miss
    with the same key: when an entry ages out under 50 busy pollers, the database sees
    one query, not 50 (a failure is raised to every request that shared it).
    """

    def __init__(self, *, ttl_s: float = DEFAULT_KEY_CACHE_TTL_S, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._pending: dict[str, asyncio.Task[ApiKey]] = {}

    @staticmethod
    def _digest(raw_key: str) -> str:
        return hashlib.sha256(raw_key.encode()).hexdigest()

    def get(self, raw_key: str) -> ApiKey | None:
        if self.ttl_s == 0:
            return None
        return self._get(self._digest(raw_key))

    def _get(self, digest: str) -> ApiKey | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        stored_at, key = entry
        expired = key.expires_at is not None and key.expires_at <= utcnow()
        if expired or self._clock() - stored_at >= self.ttl_s:
            self._entries.pop(digest, None)
            return None
        return key

    def put(self, raw_key: str, key: ApiKey) -> None:
        if self.ttl_s == 0:
            return
        self._put(self._digest(raw_key), key)

    def _put(self, digest: str, key: ApiKey) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded; a refill costs one query per key
        self._entries[digest] = (self._clock(), key)

    async def resolve(self, raw_key: str, load: Callable[[], Awaitable[ApiKey]]) -> ApiKey:
        """The cached key, or the result of ``load()`` (cached on success), with one
        ``load`` in flight per key. Call from the event loop only."""
        if self.ttl_s == 0:
            return await load()
        digest = self._digest(raw_key)
        key = self._get(digest)
        if key is not None:
            return key
        task = self._pending.get(digest)
        if task is None:
            task = asyncio.ensure_future(load())
            self._pending[digest] = task

            def settle(done: asyncio.Task[ApiKey]) -> None:
                self._pending.pop(digest, None)
                if not done.cancelled() and done.exception() is None:
                    self._put(digest, done.result())

            task.add_done_callback(settle)
        # shield: a request that goes away does not cancel the look-up others wait for
        return await asyncio.shield(task)

    def clear(self) -> None:
        self._entries.clear()


def _authenticate(factory: sessionmaker[Session], raw_key: str, touch_interval: timedelta) -> ApiKey:
    with factory() as session:
        key = authenticate(session=session, raw_key=raw_key, touch_interval=touch_interval)
        if session.dirty or session.new:
            session.commit()  # last_used_at, written at most once per touch_interval by authenticate
        _ = key.org  # loaded with the key (joined); stays readable once detached
        return key


async def get_current_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's API key (401 problem with ``WWW-Authenticate: Bearer`` if absent/invalid).

    Reads need the key's ``read`` scope, everything else ``write`` (403 otherwise).
    """
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
    raw_key = credentials.credentials
    cache: KeyCache = request.app.state.key_cache
    factory = request.app.state.session_factory
    touch_interval = timedelta(seconds=request.app.state.settings.api_key_touch_interval_s)
    key = await cache.resolve(raw_key, lambda: run_in_threadpool(_authenticate, factory, raw_key, touch_interval))
    require_scope(key, "read" if request.method in READ_METHODS else "write")
    return key


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]


async def get_current_org(key: CurrentKey) -> Organization:
    return key.org


CurrentOrg = Annotated[Organization, Depends(get_current_org)]
