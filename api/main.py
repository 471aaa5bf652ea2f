"""The FastAPI application: ``create_app(settings)`` and ``app`` for ``uvicorn api.main:app``.

Each app owns its engine, session factory, artifact store, task queue and
metrics registry (in ``app.state``), so tests build apps with their own
settings side by side. With a SQLite database (the embedded defaults) the
migrations run at start-up, so ``uvicorn api.main:app`` works out of the box;
with PostgreSQL they are a deployment step (``cleanroom admin migrate``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute, APIRouter

from api.core import scratch
from api.core.db import make_engine, make_session_factory, session_scope, upgrade_database
from api.core.services import job_queries, job_status
from api.core.services.task_queue import CeleryTaskQueue
from api.core.settings import Settings, get_settings
from api.core.store import make_store
from api.deps import DEFAULT_KEY_CACHE_TTL_S, KeyCache
from api.metrics import ApiMetrics, MetricsMiddleware
from api.problems import install_problem_handlers
from api.routers import datasets, health, jobs, models
from api.status_fastpath import StatusFastPath

log = logging.getLogger(__name__)

STATUS_POOL_SIZE = 4
"""PostgreSQL connections per API process for status reads. A poll holds one for a single
round trip, so a few are enough for the polling rates of ``bench/results/api.md``; a burst
waits briefly for a free one instead of opening (and closing) new backends."""

API_DESCRIPTION = """\
Purify backdoored image classifiers with the TSBD defense.

Upload a model (`POST /v1/models`) and datasets (`POST /v1/datasets`), submit a job
(`POST /v1/jobs`), follow it (`GET /v1/jobs/{id}`, `/events`), then fetch the result
(`/result`) and the purified model (`/model`).

Authenticate with `Authorization: Bearer <api key>`. Every error is an RFC 9457
`application/problem+json` document whose `type` is a stable URI under
`https://cleanroom.dev/problems/`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    migrate: bool | None = None,
    key_cache_ttl_s: float = DEFAULT_KEY_CACHE_TTL_S,
    status_pool_size: int = STATUS_POOL_SIZE,
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the app. ``migrate`` (default: only for SQLite) runs ``alembic upgrade head``
    at start-up; ``key_cache_ttl_s`` bounds how long an authenticated key is reused
    without a database look-up (0 = never, see :class:`api.deps.KeyCache`);
    ``status_pool_size`` bounds the PostgreSQL connections of status polling
    (see :class:`api.core.services.job_status.PgStatusReader`); ``freeze_gc`` moves every
    object that exists once start-up is done out of the cyclic garbage collector's reach
    (``gc.freeze``), as the served app (``api.main:app``) does: a full collection then
    scans only what requests allocate, instead of the many objects of the imported
    libraries (the engine, which upload validation needs, brings most of them): otherwise
    each full collection is a pause that every in-flight request waits out (the figures are
    in ``bench/results/api.md``). The engine is imported before the freeze for that reason."""
    if status_pool_size < 1:
        raise ValueError(f"status_pool_size must be >= 1, got {status_pool_size}")
    settings = settings if settings is not None else get_settings()
    run_migrations = settings.is_sqlite if migrate is None else migrate

    engine = make_engine(settings.database_url, echo=settings.database_echo)
    session_factory = make_session_factory(engine)
    status_reader = job_status.make_status_reader(
        database_url=settings.database_url, engine=engine, pool_size=status_pool_size
    )

    def count_jobs() -> dict[str, int]:
        with session_scope(session_factory) as session:
            return job_queries.counts_by_status(session=session)

    metrics = ApiMetrics(count_jobs=count_jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(settings.ensure_dirs)
        await run_in_threadpool(lambda: scratch.sweep(settings=settings, session_factory=None))
        if run_migrations:
            await run_in_threadpool(upgrade_database, settings.database_url)
        if freeze_gc:
            await run_in_threadpool(_import_engine)
            warm_up = getattr(app.state.queue, "warm_up", None)  # test queues have none
            if warm_up is not None:
                await run_in_threadpool(warm_up)
            gc.collect()
            gc.freeze()
        yield
        await status_reader.close()
        engine.dispose()

    app = FastAPI(
        title="Cleanroom",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.status_reader = status_reader
    app.state.session_factory = session_factory
    app.state.store = make_store(settings)
    app.state.queue = CeleryTaskQueue(settings)
    app.state.metrics = metrics
    app.state.key_cache = KeyCache(ttl_s=key_cache_ttl_s)

    install_problem_handlers(app)
    for router in (models.router, datasets.router, jobs.router, health.router):
        app.include_router(router)
    # Added first, so it runs inside the metrics middleware: fast-path polls are counted too.
    app.add_middleware(
        StatusFastPath, key_cache=app.state.key_cache, reader=status_reader,
        route=_route(jobs.router, "/v1/jobs/{job_id}", "GET"),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _import_engine() -> None:
    """Import what upload and job validation load on first use: the engine with its
    architecture modules (torchvision, which pulls in much of torch)."""
    import defense_core.attacks
    import defense_core.data
    import defense_core.loading
    import defense_core.pipeline  # noqa: F401
    from defense_core.registry import available_models

    available_models()  # registers the architectures by importing their modules


def _route(router: APIRouter, path: str, method: str) -> APIRoute:
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return route
    raise LookupError(f"no route {method} {path}")


def __getattr__(name: str) -> FastAPI:
    # ``app`` (for ``uvicorn api.main:app``) is built on first access with the settings
    # from the environment, so importing ``create_app`` has no side effects (no data
    # folder, no engine) in tests and tools.
    if name == "app":
        application = create_app(freeze_gc=True)
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
