"""Screening over HTTP on the embedded service as real processes (uvicorn + a Celery worker):
a screening job, intake jobs that purify the backdoored model and leave the clean one
alone, the verdict on ``GET /v1/models/{id}`` and in ``GET /v1/models?verdict=``, and
another organization that sees none of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Api, Bundle, Service, create_api_key, is_terminal

pytestmark = pytest.mark.slow

# Short stages: the fixture's models are small and the test runs on 2 shared cores.
FAST = {"seed": 0, "ft_epochs": 2, "ft_min_steps": 20, "batch_size": 64}


@pytest.fixture
def embedded(make_service, tmp_path: Path) -> tuple[Service, Api, Api]:
    service = make_service()
    service.start_api()
    database = f"sqlite:///{tmp_path / 'var' / 'cleanroom.db'}"
    service.start_worker()
    return (service, Api(base_url=service.base_url, key=create_api_key(database)),
            Api(base_url=service.base_url, key=create_api_key(database)))


def _post(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = api.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def _done(api: Api, service: Service, job_id: str) -> dict[str, Any]:
    job = api.wait_for(job_id, is_terminal, timeout=600, on_timeout=lambda: service.log_tail("worker"))
    assert job["status"] == "succeeded", (job, service.log_tail("worker"))
    return job


def test_screen_and_intake_jobs_over_http(embedded: tuple[Service, Api, Api], bundle: Bundle) -> None:
    service, api, other = embedded
    backdoored = api.upload_model(bundle)["id"]
    clean_model = api.upload_model(bundle, bundle.clean_model)["id"]
    clean = api.upload_dataset(bundle.clean, "clean")["id"]
    test = api.upload_dataset(bundle.test, "test")["id"]
    poisoned = api.upload_dataset(bundle.poisoned, "poisoned")["id"]

    # a screening job: the verdict only, from the model and clean data
    screen = _post(api, {"task": "screen", "model_id": backdoored, "clean_dataset_id": clean})
    assert screen["task"] == "screen"
    job = _done(api, service, screen["id"])
    report = api.http.get(f"/v1/jobs/{screen['id']}/result").json()
    flagged_as = report["verdict"]
    assert flagged_as in ("suspicious", "backdoored"), report
    assert report["target"] == 0 and 0.5 < report["score"] <= 1.0
    assert set(report) >= {"verdict", "score", "target", "signals", "per_class", "thresholds", "timings_s"}
    # (the summary is read out of the stored document by the database: the score as it renders it)
    assert job["summary"]["screening"] == {"verdict": flagged_as, "score": pytest.approx(report["score"]),
                                           "target": 0}
    assert job["purified_model_id"] is None
    assert any(e.get("stage") == "screening" for e in api.events(screen["id"]))
    assert api.http.get(f"/v1/jobs/{screen['id']}/model").status_code == 404

    # intake: the backdoored model is purified, the clean one left alone
    intake_bad = _post(api, {"task": "intake", "model_id": backdoored, "clean_dataset_id": clean,
                             "test_dataset_id": test, "poisoned_dataset_id": poisoned, "params": FAST})
    intake_clean = _post(api, {"task": "intake", "model_id": clean_model, "clean_dataset_id": clean,
                               "test_dataset_id": test, "poisoned_dataset_id": poisoned, "params": FAST})
    bad = _done(api, service, intake_bad["id"])
    good = _done(api, service, intake_clean["id"])
    bad_result = api.http.get(f"/v1/jobs/{intake_bad['id']}/result").json()
    good_result = api.http.get(f"/v1/jobs/{intake_clean['id']}/result").json()
    assert bad_result["decision"]["purified"] is True and bad_result["decision"]["reason"]
    assert bad["purified_model_id"] is not None and bad["summary"]["purified"] is True
    assert bad_result["metrics"]["after"]["asr"] < bad_result["metrics"]["before"]["asr"]
    downloaded = api.http.get(f"/v1/jobs/{intake_bad['id']}/model")
    assert downloaded.status_code == 200 and len(downloaded.content) > 0
    assert good_result["decision"]["purified"] is False and good_result["decision"]["reason"], good_result["screening"]
    assert good_result["screening"]["verdict"] == "clean", good_result["screening"]
    assert good["purified_model_id"] is None and good["summary"]["purified"] is False

    # the verdict belongs to the model
    shown = api.http.get(f"/v1/models/{backdoored}").json()["screening"]
    assert shown["verdict"] == flagged_as and shown["job_id"] == intake_bad["id"]
    assert api.http.get(f"/v1/models/{clean_model}").json()["screening"]["verdict"] == "clean"
    flagged = api.http.get("/v1/models", params={"verdict": flagged_as}).json()["items"]
    assert [m["id"] for m in flagged] == [backdoored]
    assert [m["id"] for m in api.http.get("/v1/models", params={"verdict": "clean"}).json()["items"]] \
        == [clean_model]

    # another organization sees none of it
    assert other.http.get("/v1/models").json()["items"] == []
    assert other.http.get("/v1/models", params={"verdict": flagged_as}).json()["items"] == []
    assert other.http.get(f"/v1/models/{backdoored}").status_code == 404
    assert other.http.get(f"/v1/jobs/{screen['id']}").status_code == 404
