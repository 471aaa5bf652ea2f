"""``GET /v1/jobs/{id}``, the status-polling path: its body is built without the ORM and
serialised without the response model, so it is checked here against the documented
schema (``JobRead``) and against the ORM-based view that the other job endpoints use."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic_core import to_json
from sqlalchemy import text

from api.core.models import Job, JobStatus, utcnow
from api.core.services.job_status import PgStatusReader
from api.routers.jobs import job_view
from api.schemas import JobRead
from tests.api.conftest import Api, Tenant
from tests.api.test_jobs import _finish_job_directly, create_job, upload_inputs


def _documented(api: Api, job_id: str) -> dict[str, Any]:
    """The job as the response model serialises it (ORM read + ``JobRead``)."""
    with api.session() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return JobRead.model_validate(job_view(job)).model_dump(mode="json")


def _poll(api: Api, tenant: Tenant, job_id: str) -> dict[str, Any]:
    response = api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    JobRead.model_validate_json(response.content, strict=False)  # conforms to the schema
    return response.json()


def _update(api: Api, job_id: str, **values: Any) -> None:
    with api.session() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)
        session.commit()


def test_status_body_equals_the_documented_model_in_every_state(api: Api,
                                                                model_bytes: bytes) -> None:
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    job_id = create_job(api, tenant, inputs.body(params={"seed": 3})).json()["id"]

    queued = _poll(api, tenant, job_id)
    assert queued == _documented(api, job_id)
    assert queued["status"] == "queued" and queued["summary"] is None
    assert queued["params"] == {"seed": 3} and queued["attempts"] == 0

    _update(api, job_id, status=JobStatus.RUNNING.value, stage="unlearning",
            started_at=utcnow(), progress_step=7, progress_total=40,
            progress_metrics={"loss": 0.25, "clean_acc": 0.5}, attempts=1)
    running = _poll(api, tenant, job_id)
    assert running == _documented(api, job_id)
    assert running["progress"] == {"step": 7, "total": 40,
                                   "metrics": {"loss": 0.25, "clean_acc": 0.5}}
    assert running["started_at"].endswith("Z")

    result = _finish_job_directly(api, job_id, content=b"purified")
    succeeded = _poll(api, tenant, job_id)
    assert succeeded == _documented(api, job_id)
    assert succeeded["summary"] == {"before": result["metrics"]["before"],
                                    "after": result["metrics"]["after"],
                                    "der": 0.95, "fidelity": 0.9,
                                    "screening": None, "purified": True}
    # the list endpoint serialises through the response model: same document
    listed = api.client.get("/v1/jobs", headers=tenant.headers).json()["items"]
    assert listed == [succeeded]


def test_partial_result_and_failed_job(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    partial = create_job(api, tenant, inputs.body()).json()["id"]
    _update(api, partial, status=JobStatus.SUCCEEDED.value, result={"der": 0.5})
    body = _poll(api, tenant, partial)
    assert body["summary"] == {"before": None, "after": None, "der": 0.5, "fidelity": None,
                               "screening": None, "purified": False}
    assert body == _documented(api, partial)

    # the screening in the summary: a section of a purify Result, or a screen job's Result
    screened = create_job(api, tenant, inputs.body()).json()["id"]
    _update(api, screened, status=JobStatus.SUCCEEDED.value,
            result={"der": 0.5, "screening": {"verdict": "backdoored", "score": 0.97, "target": 3}})
    body = _poll(api, tenant, screened)
    assert body["summary"]["screening"] == {"verdict": "backdoored", "score": 0.97, "target": 3}
    assert body == _documented(api, screened)
    screen_only = create_job(api, tenant, {**inputs.body(), "task": "screen", "test_dataset_id": None,
                                           "trigger": None, "poisoned_dataset_id": None}).json()["id"]
    _update(api, screen_only, status=JobStatus.SUCCEEDED.value,
            result={"verdict": "clean", "score": 0.02, "target": None, "signals": {}, "per_class": []})
    body = _poll(api, tenant, screen_only)
    assert body["task"] == "screen"
    assert body["summary"]["screening"] == {"verdict": "clean", "score": 0.02, "target": None}
    assert body["summary"]["purified"] is False
    assert body == _documented(api, screen_only)

    failed = create_job(api, tenant, inputs.body()).json()["id"]
    error = {"type": "https://cleanroom.dev/problems/worker-lost", "title": "Worker lost",
             "status": 500, "detail": "no heartbeat for 120 s"}
    _update(api, failed, status=JobStatus.FAILED.value, finished_at=utcnow(), error=error,
            cancel_requested=True)
    body = _poll(api, tenant, failed)
    assert body["error"] == error and body["cancel_requested"] is True
    assert body == _documented(api, failed)


def test_status_read_survives_a_database_restart(postgres_url: str,
                                                 settings_factory: Any,
                                                 model_bytes: bytes) -> None:
    """A status-read connection killed under the reader (database restart): retried once."""
    import contextlib

    from tests.api.conftest import _make_api

    with contextlib.contextmanager(_make_api)(settings_factory(database_url=postgres_url)) as api:
        tenant = api.tenant()
        inputs = upload_inputs(api, tenant, model_bytes)
        job_id = create_job(api, tenant, inputs.body()).json()["id"]
        assert _poll(api, tenant, job_id)["id"] == job_id  # the pool now holds a connection
        assert isinstance(api.app.state.status_reader, PgStatusReader)
        with api.app.state.engine.connect() as connection:
            killed = connection.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )).scalar_one()
        assert killed >= 1
        assert _poll(api, tenant, job_id)["id"] == job_id


@pytest.mark.parametrize("size", [0, -1])
def test_status_pool_size_is_validated(size: int) -> None:
    from api.main import create_app

    with pytest.raises(ValueError, match="status_pool_size"):
        create_app(status_pool_size=size)


def test_key_cache_shares_one_look_up_between_concurrent_misses() -> None:
    import asyncio

    from api.core.errors import Unauthorized
    from api.core.models import ApiKey
    from api.deps import KeyCache

    calls = {"n": 0}
    key = ApiKey(name="k", prefix="abcdefgh", secret_hash="0" * 64, scopes=["read"])

    async def load() -> ApiKey:
        calls["n"] += 1
        await asyncio.sleep(0.01)
        return key

    async def refused() -> ApiKey:
        calls["n"] += 1
        await asyncio.sleep(0.01)
        raise Unauthorized("invalid API key")

    async def scenario() -> None:
        cache = KeyCache(ttl_s=2.0)
        got = await asyncio.gather(*(cache.resolve("cr_abcdefgh_s", load) for _ in range(20)))
        assert all(k is key for k in got) and calls["n"] == 1
        assert await cache.resolve("cr_abcdefgh_s", load) is key and calls["n"] == 1  # cached
        failures = await asyncio.gather(
            *(cache.resolve("cr_abcdefgh_bad", refused) for _ in range(5)),
            return_exceptions=True)
        assert all(isinstance(f, Unauthorized) for f in failures) and calls["n"] == 2
        with pytest.raises(Unauthorized):  # a failure is not cached: asked again
            await cache.resolve("cr_abcdefgh_bad", refused)
        assert calls["n"] == 3
        disabled = KeyCache(ttl_s=0)
        await asyncio.gather(*(disabled.resolve("cr_abcdefgh_s", load) for _ in range(3)))
        assert calls["n"] == 6

    asyncio.run(scenario())


def test_pg_status_reader_bounds_and_reuses_its_connections(postgres_url: str) -> None:
    import asyncio

    from api.core.errors import NotFound

    reader = PgStatusReader(database_url=postgres_url, size=2)
    opened: list[object] = []
    connect = reader._connect

    async def counting_connect() -> Any:
        connection = await connect()
        opened.append(connection)
        return connection

    reader._connect = counting_connect  # type: ignore[method-assign]

    async def scenario() -> None:
        for _ in range(2):
            results = await asyncio.gather(
                *(reader.view(org_id=uuid.uuid4(), job_id=uuid.uuid4()) for _ in range(10)),
                return_exceptions=True)
            assert all(isinstance(r, NotFound) for r in results)
        assert len(opened) == 2  # 20 reads, never more than 2 connections, both reused
        await reader.close()
        assert all(c.closed for c in opened)  # type: ignore[attr-defined]

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="size"):
        PgStatusReader(database_url=postgres_url, size=0)


def test_pg_status_reader_answers_concurrent_polls_in_batches(postgres_url: str, settings_factory: Any,
                                                              model_bytes: bytes) -> None:
    """Polls that wait for a connection are read together, and each request still only sees
    its own organization's job (another tenant's id in the same batch is a 404)."""
    import asyncio

    from api.core.errors import NotFound
    from tests.api.conftest import _make_api

    api_iter = _make_api(settings_factory(database_url=postgres_url))
    api = next(api_iter)
    try:
        owner, other = api.tenant("owner"), api.tenant("other")
        inputs = upload_inputs(api, owner, model_bytes)
        jobs = [create_job(api, owner, inputs.body(params={"seed": i})).json()["id"] for i in range(3)]
        expected = {job_id: _poll(api, owner, job_id) for job_id in jobs}
    finally:
        next(api_iter, None)

    reader = PgStatusReader(database_url=postgres_url, size=1)
    queries: list[int] = []
    fetch = reader._fetch

    async def counting_fetch(connection: Any, job_ids: list[uuid.UUID]) -> Any:
        queries.append(len(job_ids))
        return await fetch(connection, job_ids)

    reader._fetch = counting_fetch  # type: ignore[method-assign]
    asks = [(owner.org_id, uuid.UUID(jobs[i % 3])) for i in range(24)]
    asks += [(other.org_id, uuid.UUID(jobs[0])), (owner.org_id, uuid.uuid4())]

    async def scenario() -> list[Any]:
        try:
            return await asyncio.gather(*(reader.view(org_id=o, job_id=j) for o, j in asks),
                                        return_exceptions=True)
        finally:
            await reader.close()

    results = asyncio.run(scenario())
    for (_, job_id), result in zip(asks[:24], results[:24], strict=True):
        assert not isinstance(result, BaseException), result
        assert json.loads(to_json(result)) == expected[str(job_id)]
    assert all(isinstance(r, NotFound) for r in results[24:])  # other tenant's job, unknown job
    # the first poll takes the only connection alone; the other 25 wait and share one query
    assert queries == [1, 4], queries


def test_pg_batch_statement_is_the_status_query_compiled_for_psycopg() -> None:
    """The PostgreSQL statement comes from the same column list: the status columns in
    order, then ``org_id``; the JSON paths inline, ``job_ids`` the only parameter."""
    import re

    from api.core.services import job_status

    sql = job_status._PG_STATUS_BATCH_SQL
    assert re.findall(r"%\((\w+)\)s", sql) == ["job_ids"]
    assert "#> '{metrics, before}'" in sql and "-> 'fidelity'" in sql
    selected = sql.split("FROM")[0].removeprefix("SELECT ").split(", jobs.")
    assert len(selected) == len(job_status._STATUS_COLUMNS) + 1
    assert selected[-1].strip() == "org_id"
