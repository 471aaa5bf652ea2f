"""Operations: liveness, readiness (database, broker, store) and Prometheus metrics."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from api.core.errors import Forbidden, ServiceUnavailable
from api.core.settings import Settings
from api.deps import MetricsDep, SessionDep, SettingsDep, StoreDep
from api.metrics import CONTENT_TYPE
from api.schemas import Health, Readiness, problem_responses

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

BROKER_TIMEOUT_S = 2.0


class NotReady(ServiceUnavailable):
    type = "not-ready"
    title = "Service not ready"


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health()


def _check_broker(settings: Settings) -> None:
    url = settings.broker_url
    if url.startswith("filesystem://"):
        from api.core.queue import filesystem_layout

        folder = filesystem_layout(settings).queue_folder
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ready-", dir=folder)
        os.close(fd)
        Path(probe).unlink()
    elif url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
        )
        try:
            client.ping()
        finally:
            client.close()
    else:
        from kombu import Connection

        with Connection(url, connect_timeout=BROKER_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1)


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Database, broker and store are reachable",
    responses=problem_responses(503),
)
def readyz(session: SessionDep, settings: SettingsDep, store: StoreDep) -> Readiness:
    checks: dict[str, Callable[[], object]] = {
        "database": lambda: session.execute(text("SELECT 1")).scalar_one(),
        "broker": lambda: _check_broker(settings),
        "store": store.ping,
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            log.warning("readiness check %s failed", name, exc_info=True)
            results[name] = f"failed: {type(exc).__name__}"
    failed = sorted(name for name, state in results.items() if state != "ok")
    if failed:
        raise NotReady(f"not ready: {', '.join(failed)}", extra={"checks": results})
    return Readiness(checks=results)


class MetricsForbidden(Forbidden):
    type = "metrics-forbidden"
    title = "Metrics not available to this client"


def _metrics_allowed(request: Request, settings: Settings) -> None:
    """``METRICS_TOKEN`` set: its bearer token; unset: loopback clients only."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise MetricsForbidden("GET /metrics needs 'Authorization: Bearer <METRICS_TOKEN>'")
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise MetricsForbidden("GET /metrics answers loopback clients only; set METRICS_TOKEN to scrape "
                               "it from elsewhere")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Service metrics (job counts across organizations, request rates). With "
    "METRICS_TOKEN set it needs that bearer token; without, it answers loopback clients only.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"example": "cleanroom_jobs{status=\"queued\"} 3.0\n"}}},
               **problem_responses(403)},
)
def metrics(request: Request, metrics: MetricsDep, settings: SettingsDep) -> Response:
    _metrics_allowed(request, settings)
    return Response(content=metrics.render(), media_type=CONTENT_TYPE)


