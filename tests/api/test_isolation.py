"""Tenancy: one organization never sees another's jobs, results, artifacts or downloads,
and cannot tell them from ids that do not exist (same 404 body apart from the id)."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from sqlalchemy import select

from tests.api.conftest import Api
from tests.api.test_jobs import _finish_job_directly, create_job, upload_inputs
from tests.api.test_uploads import assert_problem


def _without_ids(body: dict, *ids: str) -> dict:
    text = {k: v for k, v in body.items()}
    for key in ("detail", "instance"):
        for value in ids:
            text[key] = text[key].replace(value, "<id>")
    return text


def test_second_org_gets_404_everywhere(api: Api, model_bytes: bytes) -> None:
    owner, intruder = api.tenant("owner"), api.tenant("intruder")
    inputs = upload_inputs(api, owner, model_bytes)
    job_id = create_job(api, owner, inputs.body()).json()["id"]
    _finish_job_directly(api, job_id, content=b"purified weights")
    missing = str(uuid.uuid4())

    for path in ("", "/events", "/result", "/model"):
        theirs = api.client.get(f"/v1/jobs/{job_id}{path}", headers=intruder.headers)
        nobody = api.client.get(f"/v1/jobs/{missing}{path}", headers=intruder.headers)
        assert_problem(theirs, 404, "not-found")
        assert _without_ids(theirs.json(), job_id) == _without_ids(nobody.json(), missing)
        # the owner does see it
        assert api.client.get(f"/v1/jobs/{job_id}{path}", headers=owner.headers).status_code == 200
    assert_problem(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=intruder.headers),
                   404, "not-found")
    assert_problem(api.client.get(f"/v1/models/{inputs.model_id}", headers=intruder.headers),
                   404, "not-found")
    assert_problem(api.client.get(f"/v1/datasets/{inputs.clean_id}", headers=intruder.headers),
                   404, "not-found")
    # nor can it build a job on the owner's artifacts
    assert_problem(create_job(api, intruder, inputs.body()), 404, "not-found")
    assert api.client.get("/v1/jobs", headers=intruder.headers).json()["items"] == []


def test_bad_and_revoked_keys_are_401(sqlite_api: Api) -> None:
    from api.core.auth import revoke_api_key

    tenant = sqlite_api.tenant()
    assert sqlite_api.client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Bearer {tenant.key[:-1]}X"},
    ):
        response = sqlite_api.client.get("/v1/jobs", headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    with sqlite_api.session() as session:
        revoke_api_key(session=session, prefix=tenant.key.split("_")[1])
        session.commit()
    # an API process reuses an authenticated key for up to key_cache_ttl_s (2 s);
    # emptying the cache stands in for waiting that long
    sqlite_api.app.state.key_cache.clear()
    revoked = sqlite_api.client.get("/v1/jobs", headers=tenant.headers)
    assert_problem(revoked, 401, "unauthorized")
    assert "revoked" in revoked.json()["detail"]


def test_key_cache_expires() -> None:
    from datetime import timedelta

    from api.core.models import ApiKey, utcnow
    from api.deps import KeyCache

    now = [100.0]
    cache = KeyCache(ttl_s=2.0, clock=lambda: now[0])
    key = ApiKey(name="k", prefix="abcdefgh", secret_hash="0" * 64, scopes=["read"])
    cache.put("cr_abcdefgh_secret", key)
    assert cache.get("cr_abcdefgh_secret") is key
    assert cache.get("cr_abcdefgh_other") is None
    now[0] += 1.9
    assert cache.get("cr_abcdefgh_secret") is key
    now[0] += 0.2
    assert cache.get("cr_abcdefgh_secret") is None  # expired: looked up again
    key.expires_at = utcnow() - timedelta(seconds=1)
    cache.put("cr_abcdefgh_secret", key)
    assert cache.get("cr_abcdefgh_secret") is None  # the key itself expired
    disabled = KeyCache(ttl_s=0)
    disabled.put("cr_abcdefgh_secret", ApiKey(name="k", prefix="x", secret_hash="0", scopes=[]))
    assert disabled.get("cr_abcdefgh_secret") is None


def test_last_used_at_follows_the_touch_interval_setting(api_factory: Any) -> None:
    from api.core.models import ApiKey

    def last_used(api: Any, tenant: Any) -> Any:
        with api.session() as session:
            return session.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == tenant.key.split("_")[1]))

    for interval, rewritten in ((0.0, True), (3600.0, False)):
        with contextlib.contextmanager(api_factory)(api_key_touch_interval_s=interval) as api:
            tenant = api.tenant()
            assert api.client.get("/v1/jobs", headers=tenant.headers).status_code == 200
            first = last_used(api, tenant)
            assert first is not None
            api.app.state.key_cache.clear()  # stands in for the 2 s key cache running out
            assert api.client.get("/v1/jobs", headers=tenant.headers).status_code == 200
            assert (last_used(api, tenant) != first) is rewritten, interval
