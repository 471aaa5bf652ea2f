"""The worker's runner kills a contained child whose job it no longer owns or that ran
out of time, whatever the model's code is doing (a TorchScript loop that never returns)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable

import psutil
import pytest
from sqlalchemy import update

from api.core.db import session_scope
from api.core.models import Artifact, Job
from tests.api.conftest import Api, npz_bytes
from tests.hostile_models import SPEC, Benign, Looper, scripted_bytes
from worker.runner import JobRunner
from worker.runtime import WorkerDevice

pytestmark = pytest.mark.slow

PARAMS = {"seed": 0, "unlearn_lr": 0.01, "unlearn_max_steps": 20, "ft_epochs": 1, "ft_min_steps": 2}


def _looping_job(api: Api) -> uuid.UUID:
    tenant = api.tenant()
    model = api.upload_model(tenant, scripted_bytes(Benign()), spec=SPEC, filename="m.pt")
    clean = api.upload_dataset(tenant, npz_bytes(n=32), role="clean")
    assert model.status_code == 201 and clean.status_code == 201
    model_id = uuid.UUID(model.json()["id"])
    with session_scope(api.app.state.session_factory) as session:
        key = session.get(Artifact, model_id).storage_key
    (api.settings.local_store_root() / key).write_bytes(scripted_bytes(Looper()))  # as if validation missed it
    job = api.client.post("/v1/jobs", headers=tenant.headers, json={
        "model_id": str(model_id), "clean_dataset_id": clean.json()["id"], "params": PARAMS})
    assert job.status_code == 202, job.text
    return uuid.UUID(job.json()["id"])


def _runner(api: Api) -> JobRunner:
    return JobRunner(settings=api.settings, session_factory=api.app.state.session_factory,
                     store=api.app.state.store, runtime=WorkerDevice(device="cpu", threads=1, amp=False))


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "defense_core.sandbox" in " ".join(p.cmdline())}


def _run_in_thread(runner: JobRunner, job_id: uuid.UUID) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job_id)), daemon=True)
    thread.start()
    return thread, outcome


def test_a_lost_lease_kills_the_child(api_factory: Callable[..., object]) -> None:
    with contextlib.contextmanager(api_factory)(heartbeat_interval_s=0.5, sandbox_spares=0) as api:
        job_id = _looping_job(api)
        before = _children()
        thread, outcome = _run_in_thread(_runner(api), job_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (_children() - before):
            time.sleep(0.2)
        assert _children() - before, "the contained child did not start"
        time.sleep(2)  # in the model's endless loop now
        with session_scope(api.app.state.session_factory) as session:  # the reaper gave it to another worker
            session.execute(update(Job).where(Job.id == job_id).values(worker="elsewhere:1"))
        taken = time.monotonic()
        thread.join(timeout=30)
        assert outcome == ["lost"]
        assert time.monotonic() - taken < 10
        assert not (_children() - before)  # killed and reaped


def test_the_soft_time_limit_kills_the_child_and_fails_the_job(api_factory: Callable[..., object]) -> None:
    with contextlib.contextmanager(api_factory)(job_soft_time_limit_s=6, job_time_limit_s=60,
                                                sandbox_spares=0) as api:
        job_id = _looping_job(api)
        before = _children()
        started = time.monotonic()
        thread, outcome = _run_in_thread(_runner(api), job_id)
        thread.join(timeout=60)
        assert outcome == ["failed"] and time.monotonic() - started < 30
        assert not (_children() - before)
        with session_scope(api.app.state.session_factory) as session:
            job = session.get(Job, job_id)
            assert job.status == "failed" and job.error["type"] == "time-limit", job.error


def test_a_torch_export_archive_is_uploaded_and_purified_in_the_contained_child(
        api_factory: Callable[..., object], tmp_path) -> None:
    """The forward-looking format for custom architectures, end to end: upload, job, purified model."""
    import io

    import torch
    from safetensors.torch import load_file

    from defense_core.registry import create_model
    from defense_core.spec import ModelSpec

    spec = {**SPEC, "arch": "small_cnn"}
    model = create_model(ModelSpec.from_dict(spec)).eval()
    ep = torch.export.export(model, (torch.rand(2, 1, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    with contextlib.contextmanager(api_factory)(sandbox_spares=0) as api:
        tenant = api.tenant()
        uploaded = api.upload_model(tenant, buffer.getvalue(), spec={**SPEC, "arch": "torch_export"},
                                    filename="net.pt2")
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["format"] == "torch_export"
        clean = api.upload_dataset(tenant, npz_bytes(n=32), role="clean")
        job = api.client.post("/v1/jobs", headers=tenant.headers, json={
            "model_id": uploaded.json()["id"], "clean_dataset_id": clean.json()["id"], "params": PARAMS})
        assert job.status_code == 202, job.text
        job_id = uuid.UUID(job.json()["id"])
        assert _runner(api).run(job_id) == "succeeded"
        purified = api.client.get(f"/v1/jobs/{job_id}/model", headers=tenant.headers)
        assert purified.status_code == 200
        (tmp_path / "p.safetensors").write_bytes(purified.content)
        state = load_file(tmp_path / "p.safetensors")
        assert set(state) == set(model.state_dict())  # the original layer names, loadable into small_cnn
        model.load_state_dict(state)
