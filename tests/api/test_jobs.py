"""Jobs over HTTP: validation, idempotency, enqueue after commit, listing, events,
cancel, result and purified-model download.

The worker is not running here. Tests that need a finished job set its state
directly in the database (see ``_finish_job_directly``); the worker's own
transitions are tested in tests/worker."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from api.core.models import Artifact, Job, JobStatus, utcnow
from api.core.store import artifact_key
from tests.api.conftest import Api, Tenant, npz_bytes
from tests.api.test_uploads import assert_problem


@dataclass(frozen=True)
class Inputs:
    model_id: str
    clean_id: str
    test_id: str
    poisoned_id: str

    def body(self, **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "model_id": self.model_id,
            "clean_dataset_id": self.clean_id,
            "test_dataset_id": self.test_id,
            "poisoned_dataset_id": self.poisoned_id,
        }
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}


def upload_inputs(api: Api, tenant: Tenant, model_bytes: bytes) -> Inputs:
    ids = []
    for response in (
        api.upload_model(tenant, model_bytes),
        api.upload_dataset(tenant, npz_bytes(n=12, seed=1), role="clean"),
        api.upload_dataset(tenant, npz_bytes(n=12, seed=2), role="test"),
        api.upload_dataset(tenant, npz_bytes(n=12, seed=3, target=0), role="poisoned"),
    ):
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return Inputs(*ids)


def create_job(api: Api, tenant: Tenant, body: dict[str, Any], **headers: str) -> Any:
    return api.client.post("/v1/jobs", json=body, headers={**tenant.headers, **headers})


def _finish_job_directly(api: Api, job_id: str, *, content: bytes) -> dict[str, Any]:
    """Mark a job succeeded with a Result document and a purified model, by writing the
    rows and the stored object directly (stands in for the worker)."""
    result = {
        "metrics": {"before": {"ca": 0.9, "asr": 0.95, "ra": 0.04},
                    "after_stage1": {"ca": 0.5, "asr": 0.9, "ra": 0.05},
                    "after": {"ca": 0.88, "asr": 0.03, "ra": 0.85}},
        "der": 0.95, "fidelity": 0.9,
        "timings_s": {"unlearning": 1.0, "ranking": 0.1, "reinitializing": 0.1,
                      "finetuning": 2.0, "evaluating": 0.3, "total": 3.5},
        "unlearning": {"epochs": 1, "steps": 3, "final_clean_acc": 0.25},
        "reinit": {"neuron_ratio": 0.05, "weight_ratio": 0.7, "neurons_zeroed": 3,
                   "weights_zeroed": 20},
        "top_neurons": [{"layer": "conv3", "channel": 5, "nwc": 0.7}],
        "params": {}, "model_sha256": hashlib.sha256(content).hexdigest(),
    }
    store = api.app.state.store
    with api.session() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        artifact_id = uuid.uuid4()
        key = artifact_key(org_id=job.org_id, artifact_id=artifact_id, suffix=".safetensors")
        source = api.settings.data_dir / "purified.bin"
        source.write_bytes(content)
        stored = store.put_file(key, source)
        session.add(Artifact(id=artifact_id, org_id=job.org_id, kind="purified_model",
                             format="safetensors", filename="purified.safetensors",
                             size=stored.size, sha256=stored.sha256, storage_key=key,
                             meta={"job_id": job_id}))
        session.flush()
        now = utcnow()
        job.status, job.started_at, job.finished_at = JobStatus.SUCCEEDED.value, now, now
        job.result, job.purified_model_id = result, artifact_id
        session.commit()
    return result


def test_create_get_and_enqueue(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    response = create_job(api, tenant, inputs.body(params={}))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["defense"] == "tsbd"
    assert job["progress"] == {"step": None, "total": None, "metrics": None}
    fetched = api.client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    assert fetched.status_code == 200 and fetched.json()["id"] == job["id"]
    # enqueued by name after the commit: the task id is recorded and a message is waiting
    with api.session() as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row is not None and row.task_id
    queue_folder = api.settings.data_dir / "broker" / "queue"
    assert len(list(queue_folder.iterdir())) == 1


def test_enqueue_failure_leaves_the_job_queued(sqlite_api: Api, model_bytes: bytes) -> None:
    class BrokenQueue:
        def enqueue_purify(self, job_id: uuid.UUID) -> str:
            raise ConnectionError("broker down")

        def revoke(self, task_id: str | None) -> bool:
            return False

    tenant = sqlite_api.tenant()
    inputs = upload_inputs(sqlite_api, tenant, model_bytes)
    sqlite_api.app.state.queue = BrokenQueue()
    response = create_job(sqlite_api, tenant, inputs.body())
    assert response.status_code == 202
    with sqlite_api.session() as session:
        row = session.get(Job, uuid.UUID(response.json()["id"]))
        assert row is not None and row.status == "queued" and row.task_id is None


def test_trigger_instead_of_poisoned_set(sqlite_api: Api, model_bytes: bytes) -> None:
    tenant = sqlite_api.tenant()
    inputs = upload_inputs(sqlite_api, tenant, model_bytes)
    trigger = {"type": "badnets", "target": 1}
    ok = create_job(sqlite_api, tenant, inputs.body(poisoned_dataset_id=None, trigger=trigger))
    assert ok.status_code == 202, ok.text
    assert ok.json()["trigger"]["type"] == "badnets"
    both = create_job(sqlite_api, tenant, inputs.body(trigger=trigger))
    assert_problem(both, 422, "conflicting-inputs")
    no_test = create_job(sqlite_api, tenant, inputs.body(poisoned_dataset_id=None,
                                                         test_dataset_id=None, trigger=trigger))
    assert_problem(no_test, 422, "missing-test-dataset")
    bad_target = create_job(sqlite_api, tenant, inputs.body(
        poisoned_dataset_id=None, trigger={"type": "badnets", "target": 7}))
    assert_problem(bad_target, 422, "label-out-of-range")
    bad_type = create_job(sqlite_api, tenant, inputs.body(
        poisoned_dataset_id=None, trigger={"type": "laser", "target": 0}))
    assert bad_type.status_code == 422
    pattern = [[0, 255], [255, 0]]
    blended = create_job(sqlite_api, tenant, inputs.body(
        poisoned_dataset_id=None, trigger={"type": "blended", "target": 0, "pattern": pattern}))
    assert blended.status_code == 202, blended.text
    assert blended.json()["trigger"]["pattern"] == pattern
    bad_pattern = create_job(sqlite_api, tenant, inputs.body(
        poisoned_dataset_id=None, trigger={"type": "blended", "target": 0, "pattern": [[0, 300]]}))
    assert bad_pattern.status_code == 422
    assert "blended.pattern" in bad_pattern.json()["detail"]


def test_job_validation(sqlite_api: Api, model_bytes: bytes) -> None:
    tenant = sqlite_api.tenant()
    inputs = upload_inputs(sqlite_api, tenant, model_bytes)
    # roles and kinds
    assert_problem(create_job(sqlite_api, tenant, inputs.body(clean_dataset_id=inputs.test_id)),
                   422, "wrong-dataset-role")
    assert_problem(create_job(sqlite_api, tenant, inputs.body(model_id=inputs.clean_id)),
                   422, "wrong-artifact-kind")
    assert_problem(create_job(sqlite_api, tenant, inputs.body(clean_dataset_id=inputs.model_id)),
                   422, "wrong-artifact-kind")
    # unknown ids are 404, like another organization's
    missing = create_job(sqlite_api, tenant, inputs.body(model_id=str(uuid.uuid4())))
    assert_problem(missing, 404, "not-found")
    # data that does not fit the model (4 classes, 1x16x16)
    wide = sqlite_api.upload_dataset(tenant, npz_bytes(n=8, num_classes=9), role="clean")
    assert wide.status_code == 201
    body = assert_problem(create_job(sqlite_api, tenant, inputs.body(clean_dataset_id=wide.json()["id"])),
                          422, "label-out-of-range")
    assert "4 classes" in body["detail"]
    rgb = sqlite_api.upload_dataset(tenant, npz_bytes(n=8, channels=3), role="test")
    assert rgb.status_code == 201
    assert_problem(create_job(sqlite_api, tenant, inputs.body(test_dataset_id=rgb.json()["id"])),
                   422, "shape-mismatch")
    # params are checked by the engine's config and the bad one is named
    unknown = create_job(sqlite_api, tenant, inputs.body(params={"no_such_param": 1}))
    assert_problem(unknown, 422, "invalid-input")
    assert "no_such_param" in unknown.json()["detail"]
    out_of_range = create_job(sqlite_api, tenant, inputs.body(params={"neuron_ratio": 1.5}))
    assert_problem(out_of_range, 422, "invalid-input")
    assert "neuron_ratio" in out_of_range.json()["detail"]
    not_for_ft = create_job(sqlite_api, tenant, inputs.body(defense="ft", params={"alpha": 0.5}))
    assert "alpha" in assert_problem(not_for_ft, 422, "invalid-input")["detail"]
    typed = create_job(sqlite_api, tenant, inputs.body(params={"seed": [1, 2]}))
    assert typed.status_code == 422
    fine = create_job(sqlite_api, tenant, inputs.body(params={"neuron_ratio": 0.1, "seed": 3}))
    assert fine.status_code == 202 and fine.json()["params"] == {"neuron_ratio": 0.1, "seed": 3}
    # the n sweep picks n by DER: it needs poisoned data (a poisoned set or a trigger) and a test set
    no_poison = create_job(sqlite_api, tenant, inputs.body(poisoned_dataset_id=None,
                                                           params={"neuron_ratio": "sweep"}))
    assert_problem(no_poison, 422, "sweep-needs-poisoned-data")
    swept = create_job(sqlite_api, tenant, inputs.body(params={"neuron_ratio": [0.05, 0.1]}))
    assert swept.status_code == 202 and swept.json()["params"] == {"neuron_ratio": [0.05, 0.1]}
    # request validation (FastAPI) is a problem too, with the errors listed
    schema = assert_problem(create_job(sqlite_api, tenant, {"model_id": "nope"}), 422,
                            "validation-error")
    assert {tuple(e["loc"]) for e in schema["errors"]} >= {("body", "model_id"),
                                                           ("body", "clean_dataset_id")}
    assert_problem(create_job(sqlite_api, tenant, inputs.body(defense="magic")), 422,
                   "validation-error")


def test_idempotency(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    first = create_job(api, tenant, inputs.body(), **{"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    again = create_job(api, tenant, inputs.body(), **{"Idempotency-Key": "k-1"})
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    # the defaults count: spelling out defense="tsbd" is the same request
    same = create_job(api, tenant, inputs.body(defense="tsbd", params={}),
                      **{"Idempotency-Key": "k-1"})
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    other = create_job(api, tenant, inputs.body(defense="ft"), **{"Idempotency-Key": "k-1"})
    body = assert_problem(other, 422, "idempotency-key-reused")
    assert body["job_id"] == first.json()["id"]
    # another organization may use the same key for its own job
    other_tenant = api.tenant("other")
    other_inputs = upload_inputs(api, other_tenant, model_bytes)
    theirs = create_job(api, other_tenant, other_inputs.body(), **{"Idempotency-Key": "k-1"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    page = api.client.get("/v1/jobs", headers=tenant.headers).json()
    assert [job["id"] for job in page["items"]] == [first.json()["id"]]


def test_pagination_newest_first_with_status_filter(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    created = [create_job(api, tenant, inputs.body()).json()["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = api.client.get("/v1/jobs", params=params, headers=tenant.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [job["id"] for job in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(created))
    cancel = api.client.post(f"/v1/jobs/{created[1]}/cancel", headers=tenant.headers)
    assert cancel.status_code == 200
    cancelled = api.client.get("/v1/jobs", params={"status": "cancelled"},
                               headers=tenant.headers).json()
    assert [job["id"] for job in cancelled["items"]] == [created[1]]
    assert_problem(api.client.get("/v1/jobs", params={"cursor": "garbage!"},
                                  headers=tenant.headers), 422, "invalid-cursor")
    assert_problem(api.client.get("/v1/jobs", params={"limit": 101}, headers=tenant.headers),
                   422, "validation-error")
    assert_problem(api.client.get("/v1/jobs", params={"status": "done"}, headers=tenant.headers),
                   422, "validation-error")


def test_cancel_events_and_conflicts(api: Api, model_bytes: bytes) -> None:
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    job_id = create_job(api, tenant, inputs.body()).json()["id"]
    url = f"/v1/jobs/{job_id}"
    cancelled = api.client.post(f"{url}/cancel", headers=tenant.headers)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    assert_problem(api.client.post(f"{url}/cancel", headers=tenant.headers), 409,
                   "job-already-finished")
    events = api.client.get(f"{url}/events", headers=tenant.headers).json()
    assert [(e["kind"], e["status"]) for e in events["items"]] == [
        ("status", "queued"), ("status", "cancelled")]
    first_id = events["items"][0]["id"]
    newer = api.client.get(f"{url}/events", params={"after": first_id},
                           headers=tenant.headers).json()
    assert [e["status"] for e in newer["items"]] == ["cancelled"]
    assert newer["next_after"] == events["items"][1]["id"]
    assert_problem(api.client.get(f"{url}/result", headers=tenant.headers), 409,
                   "job-not-succeeded")


def test_cancel_running_job_requests_it(sqlite_api: Api, model_bytes: bytes) -> None:
    tenant = sqlite_api.tenant()
    inputs = upload_inputs(sqlite_api, tenant, model_bytes)
    job_id = create_job(sqlite_api, tenant, inputs.body()).json()["id"]
    with sqlite_api.session() as session:  # stands in for the worker claiming the job
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.status, job.stage, job.started_at = "running", "unlearning", utcnow()
        session.commit()
    response = sqlite_api.client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True


def test_result_and_download_of_a_finished_job(api: Api, model_bytes: bytes) -> None:
    """The job's final state is written directly (no worker in this test)."""
    tenant = api.tenant()
    inputs = upload_inputs(api, tenant, model_bytes)
    job_id = create_job(api, tenant, inputs.body()).json()["id"]
    assert_problem(api.client.get(f"/v1/jobs/{job_id}/model", headers=tenant.headers), 409,
                   "job-not-succeeded")
    purified = bytes(np.arange(3 * (1 << 20) + 7, dtype=np.uint8) % 251)  # > 1 chunk
    result = _finish_job_directly(api, job_id, content=purified)
    got = api.client.get(f"/v1/jobs/{job_id}/result", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == result
    job = api.client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded"
    assert job["summary"] == {"before": result["metrics"]["before"],
                              "after": result["metrics"]["after"], "der": 0.95, "fidelity": 0.9,
                              "screening": None, "purified": True}
    download = api.client.get(f"/v1/jobs/{job_id}/model", headers=tenant.headers)
    assert download.status_code == 200
    digest = hashlib.sha256(purified).hexdigest()
    assert download.content == purified
    assert download.headers["x-content-sha256"] == digest
    assert download.headers["etag"] == f'"{digest}"'
    assert download.headers["content-length"] == str(len(purified))
    assert download.headers["content-disposition"] == (
        f'attachment; filename="purified-{job_id}.safetensors"')
    cached = api.client.get(f"/v1/jobs/{job_id}/model",
                            headers={**tenant.headers, "If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304 and cached.content == b""
    assert_problem(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers), 409,
                   "job-already-finished")


@pytest.mark.parametrize("path", ["", "/events", "/result", "/model"])
def test_unknown_job_is_404(sqlite_api: Api, path: str) -> None:
    tenant = sqlite_api.tenant()
    response = sqlite_api.client.get(f"/v1/jobs/{uuid.uuid4()}{path}", headers=tenant.headers)
    assert_problem(response, 404, "not-found")


def test_a_trigger_that_does_not_fit_the_models_input_is_refused() -> None:
    from api.core.services import RejectedInput
    from api.core.services.jobs import _check_trigger

    rgb_pattern = {"type": "blended", "target": 0, "pattern": [[[1, 2, 3]]]}
    _check_trigger(rgb_pattern, spec={"num_classes": 4, "in_channels": 3, "input_size": [8, 8]})
    _check_trigger(rgb_pattern, spec={"num_classes": 4, "in_channels": 1, "input_size": [8, 8]})  # grey
    with pytest.raises(RejectedInput, match="3 channels, the images have 2"):
        _check_trigger(rgb_pattern, spec={"num_classes": 4, "in_channels": 2, "input_size": [8, 8]})
