"""The verdict belongs to the model: a succeeded job that screened a model records its
latest screening on it; ``GET /v1/models/{id}`` shows it and ``GET /v1/models?verdict=``
lists the organization's models by verdict, newest first, a page at a time. The jobs are
finished through the real lifecycle (claim, then succeed) standing in for a worker."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from api.core.models import utcnow
from api.core.services import lifecycle
from tests.api.conftest import Api, Tenant, npz_bytes
from tests.api.test_jobs import create_job

WORKER = "test-host:1"


def _model_and_clean(api: Api, tenant: Tenant, model_bytes: bytes) -> tuple[str, str]:
    model = api.upload_model(tenant, model_bytes)
    clean = api.upload_dataset(tenant, npz_bytes(n=12, seed=1), role="clean")
    assert model.status_code == 201 and clean.status_code == 201, (model.text, clean.text)
    return model.json()["id"], clean.json()["id"]


def _finish(api: Api, job_id: str, result: dict[str, Any], *, at: Any = None) -> None:
    with api.session() as session:
        claim = lifecycle.claim(session=session, job_id=uuid.UUID(job_id), worker=WORKER,
                                stale_after_s=60, max_attempts=3)
        assert claim.outcome.value == "claimed", claim
        session.commit()
        assert lifecycle.succeed(session=session, job_id=uuid.UUID(job_id), worker=WORKER,
                                 result=result, purified=None, now=at) is not None
        session.commit()


def _screen_job(api: Api, tenant: Tenant, model_id: str, clean_id: str, report: dict[str, Any],
                **finish: Any) -> str:
    response = create_job(api, tenant, {"model_id": model_id, "clean_dataset_id": clean_id,
                                        "task": "screen"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    _finish(api, job_id, report, **finish)
    return job_id


def _report(verdict: str, score: float, target: int | None) -> dict[str, Any]:
    return {"verdict": verdict, "score": score, "target": target, "signals": {}, "per_class": [],
            "thresholds": {}, "timings_s": {}}


def test_a_model_shows_its_latest_screening_and_lists_by_verdict(api: Api, model_bytes: bytes) -> None:
    tenant, other = api.tenant(), api.tenant("other")
    flagged, clean_id = _model_and_clean(api, tenant, model_bytes)
    clean_model, _ = _model_and_clean(api, tenant, model_bytes)
    never, _ = _model_and_clean(api, tenant, model_bytes)

    fresh = api.client.get(f"/v1/models/{flagged}", headers=tenant.headers).json()
    assert fresh["screening"] is None

    earlier = utcnow() - timedelta(minutes=5)
    _screen_job(api, tenant, flagged, clean_id, _report("clean", 0.1, None), at=earlier)
    job_id = _screen_job(api, tenant, flagged, clean_id, _report("backdoored", 0.98, 7))
    # a purify job's Result carries the screening as a section
    purify = create_job(api, tenant, {"model_id": clean_model, "clean_dataset_id": clean_id})
    assert purify.status_code == 202, purify.text
    _finish(api, purify.json()["id"], {"der": 0.5, "screening": _report("clean", 0.03, None)})

    shown = api.client.get(f"/v1/models/{flagged}", headers=tenant.headers).json()["screening"]
    assert shown["verdict"] == "backdoored" and shown["score"] == 0.98 and shown["target"] == 7
    assert shown["job_id"] == job_id

    def listed(verdict: str | None, who: Tenant = tenant, **params: Any) -> dict[str, Any]:
        query = {**({"verdict": verdict} if verdict else {}), **params}
        response = api.client.get("/v1/models", params=query, headers=who.headers)
        assert response.status_code == 200, response.text
        return response.json()

    assert [m["id"] for m in listed("backdoored")["items"]] == [flagged]
    assert [m["id"] for m in listed("clean")["items"]] == [clean_model]
    assert listed("suspicious")["items"] == []
    everything = listed(None)["items"]
    assert [m["id"] for m in everything] == [never, clean_model, flagged]  # newest first
    assert {m["kind"] for m in everything} == {"model"}

    first = listed(None, limit=2)
    assert [m["id"] for m in first["items"]] == [never, clean_model] and first["next_cursor"]
    second = listed(None, limit=2, cursor=first["next_cursor"])
    assert [m["id"] for m in second["items"]] == [flagged] and second["next_cursor"] is None

    # another organization sees none of it
    assert listed(None, other)["items"] == [] and listed("backdoored", other)["items"] == []
    assert api.client.get(f"/v1/models/{flagged}", headers=other.headers).status_code == 404


def test_an_older_screening_does_not_replace_a_newer_one(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    model_id, clean_id = _model_and_clean(api, tenant, model_bytes)
    _screen_job(api, tenant, model_id, clean_id, _report("suspicious", 0.6, 2))
    _screen_job(api, tenant, model_id, clean_id, _report("clean", 0.05, None),
                at=utcnow() - timedelta(hours=1))
    assert api.client.get(f"/v1/models/{model_id}", headers=tenant.headers).json()["screening"]["verdict"] \
        == "suspicious"


def test_bad_model_list_queries_are_problems(sqlite_api: Api) -> None:
    tenant = sqlite_api.tenant()
    for params in ({"verdict": "maybe"}, {"limit": 0}, {"cursor": "not-a-cursor"}):
        response = sqlite_api.client.get("/v1/models", params=params, headers=tenant.headers)
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert sqlite_api.client.get("/v1/models").status_code == 401


def test_a_screen_job_takes_no_test_or_poisoned_data(sqlite_api: Api, model_bytes: bytes) -> None:
    tenant = sqlite_api.tenant()
    model_id, clean_id = _model_and_clean(sqlite_api, tenant, model_bytes)
    test = sqlite_api.upload_dataset(tenant, npz_bytes(n=12, seed=2), role="test").json()["id"]
    response = create_job(sqlite_api, tenant, {"model_id": model_id, "clean_dataset_id": clean_id,
                                               "test_dataset_id": test, "task": "screen"})
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/unexpected-input")
    assert "test_dataset_id" in response.json()["detail"]
    unknown = create_job(sqlite_api, tenant, {"model_id": model_id, "clean_dataset_id": clean_id,
                                              "task": "audit"})
    assert unknown.status_code == 422
    # a screened job has no purified model to download
    job_id = _screen_job(sqlite_api, tenant, model_id, clean_id, _report("clean", 0.02, None))
    download = sqlite_api.client.get(f"/v1/jobs/{job_id}/model", headers=tenant.headers)
    assert download.status_code == 404 and "produced no purified model" in download.json()["detail"]


def test_the_recorded_screening_keeps_only_well_formed_values() -> None:
    """The verdict comes from the contained child's document: what is recorded is checked."""
    from api.core.services.lifecycle import screening_of

    assert screening_of({"screening": {"verdict": "suspicious", "score": 0.6, "target": 2}}) == \
        {"verdict": "suspicious", "score": 0.6, "target": 2}
    assert screening_of({"verdict": "clean", "score": float("nan"), "target": -1}) == \
        {"verdict": "clean", "score": None, "target": None}
    assert screening_of({"verdict": "backdoored", "score": True, "target": 1.5}) == \
        {"verdict": "backdoored", "score": None, "target": None}
    assert screening_of({"verdict": "maybe", "score": 0.5}) is None
    assert screening_of({"der": 0.9}) is None
