"""Operations endpoints, problem+json for framework errors, the OpenAPI document."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from fastapi.testclient import TestClient

from api.core.settings import Settings
from api.main import create_app
from tests.api.conftest import Api, npz_bytes
from tests.api.test_uploads import assert_problem


def test_healthz_and_readyz(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}


def test_readyz_lists_what_failed(api_factory: Any) -> None:
    # nothing listens on port 1: the broker check fails, the rest still pass
    with contextlib.contextmanager(api_factory)(broker_url="redis://127.0.0.1:1/0") as api:
        response = api.client.get("/readyz")
        body = assert_problem(response, 503, "not-ready")
        assert body["checks"]["database"] == "ok" and body["checks"]["store"] == "ok"
        assert body["checks"]["broker"].startswith("failed")
        assert "broker" in body["detail"]


def test_readyz_with_redis(api_factory: Any, redis_url: str) -> None:
    with contextlib.contextmanager(api_factory)(broker_url=redis_url) as api:
        assert api.client.get("/readyz").json()["checks"]["broker"] == "ok"


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, value = line[len(name) + 1:].rsplit("} ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics(api: Api, model_bytes: bytes) -> None:
    from tests.api.test_jobs import create_job, upload_inputs

    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    job_id = create_job(api, tenant, inputs.body()).json()["id"]
    for _ in range(3):
        assert api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).status_code == 200
    api.client.get("/no/such/route")
    text = api.metrics_text()
    route = "/v1/jobs/{job_id}"
    assert _sample(text, "cleanroom_http_requests_total", method="GET", route=route,
                   status="200") == 3
    assert _sample(text, "cleanroom_http_request_duration_seconds_count", method="GET",
                   route=route, status="200") == 3
    assert _sample(text, "cleanroom_http_requests_total", route="<unmatched>", status="404") == 1
    assert _sample(text, "cleanroom_jobs", status="queued") >= 1
    # the body bytes of 1 model + 3 dataset uploads (payload plus multipart framing)
    assert _sample(text, "cleanroom_upload_bytes_total", kind="model") > len(model_bytes)
    assert _sample(text, "cleanroom_upload_bytes_total", kind="dataset") > 3 * len(npz_bytes())


def test_framework_errors_are_problems(sqlite_api: Api) -> None:
    assert_problem(sqlite_api.client.get("/v2/nothing"), 404, "not-found")
    assert_problem(sqlite_api.client.delete("/v1/jobs"), 405, "method-not-allowed")
    tenant = sqlite_api.tenant()
    bad_id = sqlite_api.client.get("/v1/jobs/not-a-uuid", headers=tenant.headers)
    body = assert_problem(bad_id, 422, "validation-error")
    assert body["errors"][0]["loc"] == ["path", "job_id"]
    bad_json = sqlite_api.client.post("/v1/jobs", content=b"{not json",
                                      headers={**tenant.headers, "Content-Type": "application/json"})
    assert_problem(bad_json, 422, "validation-error")


def test_unexpected_errors_are_generic_500_problems(settings_factory: Any) -> None:
    app = create_app(settings_factory(), migrate=False)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    body = assert_problem(response, 500, "internal-error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert body["instance"] == "/boom"


def test_openapi_has_examples_for_every_operation(settings_factory: Any) -> None:
    app = create_app(settings_factory(), migrate=False)
    spec = app.openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = [(path, method, op) for path, item in spec["paths"].items()
                  for method, op in item.items()]
    assert len(operations) == 15  # GET /v1/models included
    for path, method, op in operations:
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                content = response["content"]["application/problem+json"]
                assert "example" in content, (path, method, status)
        if path.startswith("/v1/"):
            assert "401" in op["responses"], (path, method)
    uploads = spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert uploads["schema"]["required"] == ["file", "spec"]
    assert "examples" in spec["components"]["schemas"]["JobCreate"]


def test_docs_page(sqlite_api: Api) -> None:
    assert "swagger" in sqlite_api.client.get("/docs").text.lower()


def test_embedded_app_migrates_sqlite_on_start(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    with TestClient(create_app(settings)) as client:  # no fixture migrated this database
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 403  # not a loopback client, no token set
    assert (tmp_path / "var" / "cleanroom.db").is_file()


def test_metrics_need_the_token_when_one_is_set(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path / "var", metrics_token="scrape-me")
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me"}):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 403
            assert refused.headers["content-type"].startswith("application/problem+json")
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
