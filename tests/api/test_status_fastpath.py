"""The lean path for ``GET /v1/jobs/{id}``: same bytes as the routed endpoint, counted in the
metrics, and every case it does not own (unknown key, scope, other tenant's or unknown job,
bad id) answered by the application exactly as without it."""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from api.status_fastpath import StatusFastPath
from tests.api.conftest import Api
from tests.api.test_jobs import create_job, upload_inputs
from tests.api.test_uploads import assert_problem


class _Recorder:
    """Wraps the application below the fast path and records the paths it was given."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


def _fast_path(api: Api) -> StatusFastPath:
    api.client.get("/healthz")  # builds the middleware stack
    layer: Any = api.app.middleware_stack
    while layer is not None and not isinstance(layer, StatusFastPath):
        layer = getattr(layer, "app", None)
    assert isinstance(layer, StatusFastPath), "the fast path is not in the middleware stack"
    return layer


def _recorder(api: Api) -> _Recorder:
    fast = _fast_path(api)
    recorder = _Recorder(fast.app)
    fast.app = recorder
    return recorder


def test_cached_poll_skips_the_router_and_returns_the_same_bytes(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    job_id = create_job(api, tenant, upload_inputs(api, tenant, model_bytes).body()).json()["id"]
    recorder = _recorder(api)
    api.app.state.key_cache.clear()

    routed = api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)  # key not cached yet
    fast = api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)    # key cached now
    assert recorder.paths == [f"/v1/jobs/{job_id}"], "the second poll went through the router"
    assert routed.status_code == fast.status_code == 200
    assert fast.content == routed.content
    assert fast.headers == routed.headers
    assert fast.json()["id"] == job_id and fast.json()["status"] == "queued"

    # both polls are in the request metrics, under the route template
    metrics = api.metrics_text()
    line = next(ln for ln in metrics.splitlines() if ln.startswith("cleanroom_http_requests_total{")
                and 'route="/v1/jobs/{job_id}"' in ln and 'status="200"' in ln and 'method="GET"' in ln)
    assert float(line.rsplit(" ", 1)[1]) == 2.0


def test_cases_the_fast_path_does_not_own_reach_the_app(api: Api, model_bytes: bytes) -> None:
    owner, intruder = api.tenant("owner"), api.tenant("intruder")
    writer = api.tenant("writer", scopes=("write",))
    job_id = create_job(api, owner, upload_inputs(api, owner, model_bytes).body()).json()["id"]
    for tenant in (owner, intruder, writer):  # every key authenticated once, so cached
        api.client.get("/v1/jobs", headers=tenant.headers)
    recorder = _recorder(api)

    assert_problem(api.client.get(f"/v1/jobs/{job_id}", headers=intruder.headers), 404, "not-found")
    assert_problem(api.client.get(f"/v1/jobs/{job_id}", headers=writer.headers), 403, "forbidden")
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_problem(api.client.get(f"/v1/jobs/{unknown}", headers=owner.headers), 404, "not-found")
    assert_problem(api.client.get("/v1/jobs/not-a-uuid", headers=owner.headers), 422, "validation-error")
    missing = api.client.get(f"/v1/jobs/{job_id}")
    assert_problem(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_problem(api.client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer nope"}),
                   401, "unauthorized")
    odd = job_id.replace("-", "")[:7] + "-" + job_id.replace("-", "")[7:] + "---"  # 36 chars, hyphens moved
    api.client.get(f"/v1/jobs/{odd}", headers=owner.headers)  # whatever the router says, it says it
    assert len(recorder.paths) == 7, recorder.paths

    # sub-resources are routed as before
    assert api.client.get(f"/v1/jobs/{job_id}/events", headers=owner.headers).status_code == 200
    assert recorder.paths[-1] == f"/v1/jobs/{job_id}/events"


def test_a_revoked_key_is_refused_once_the_cache_entry_is_gone(sqlite_api: Api, model_bytes: bytes) -> None:
    from api.core.auth import revoke_api_key

    tenant = sqlite_api.tenant()
    job_id = create_job(sqlite_api, tenant, upload_inputs(sqlite_api, tenant, model_bytes).body()).json()["id"]
    assert sqlite_api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).status_code == 200
    with sqlite_api.session() as session:
        revoke_api_key(session=session, prefix=tenant.key.split("_")[1])
        session.commit()
    sqlite_api.app.state.key_cache.clear()  # stands in for the cache's 2 s lifetime passing
    revoked = sqlite_api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
    assert_problem(revoked, 401, "unauthorized")
