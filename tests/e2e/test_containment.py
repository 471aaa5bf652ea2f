"""Hostile models in jobs, on the embedded service as real processes (uvicorn + a Celery worker).

The models are put in the store directly, as if upload validation had missed
them: what is tested is what the worker's contained child does with them.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, update

from tests.e2e.conftest import Api, Service, create_api_key, is_terminal
from tests.hostile_models import SPEC, Benign, FileReader, Looper, scripted_bytes

pytestmark = pytest.mark.slow

FAST = {"seed": 0, "unlearn_lr": 0.01, "unlearn_max_steps": 20, "ft_epochs": 2, "ft_min_steps": 4,
        "batch_size": 32}


def _npz(n: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), y=np.arange(n) % 4)
    return buffer.getvalue()


@pytest.fixture
def embedded(make_service, tmp_path: Path) -> tuple[Service, Api]:
    service = make_service()
    service.start_api()
    service.key = create_api_key(f"sqlite:///{tmp_path / 'var' / 'cleanroom.db'}")
    service.start_worker()
    return service, Api(base_url=service.base_url, key=service.key)


def _model(api: Api, tmp_path: Path, content: bytes) -> str:
    """A model artifact holding ``content``: uploaded as a benign archive, then swapped."""
    import json

    response = api.http.post("/v1/models", files={"file": ("m.pt", scripted_bytes(Benign()))},
                             data={"spec": json.dumps(SPEC)})
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'cleanroom.db'}")
    from api.core.models import Artifact

    with engine.begin() as connection:
        key = connection.execute(Artifact.__table__.select().where(
            Artifact.__table__.c.id == uuid.UUID(model_id))).one().storage_key
        (tmp_path / "var" / "artifacts" / key).write_bytes(content)
        connection.execute(update(Artifact).where(Artifact.id == uuid.UUID(model_id)).values(
            size=len(content), sha256=hashlib.sha256(content).hexdigest()))
    engine.dispose()
    return model_id


def _job(api: Api, model_id: str, clean_id: str, params: dict[str, Any]) -> dict[str, Any]:
    response = api.http.post("/v1/jobs", json={"model_id": model_id, "clean_dataset_id": clean_id,
                                               "defense": "tsbd", "params": params})
    assert response.status_code == 202, response.text
    return response.json()


def _clean(api: Api) -> str:
    response = api.http.post("/v1/datasets", files={"file": ("c.npz", _npz())}, data={"role": "clean"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_model_that_never_returns_is_killed_on_cancel_and_the_worker_runs_the_next_job(
        embedded: tuple[Service, Api], tmp_path: Path) -> None:
    service, api = embedded
    clean_id = _clean(api)
    looping = _job(api, _model(api, tmp_path, scripted_bytes(Looper())), clean_id, FAST)
    api.wait_for(looping["id"], lambda j: j["status"] == "running", timeout=60,
                 on_timeout=lambda: service.log_tail("worker"))
    time.sleep(3)  # inside the model's endless loop by now
    assert api.job(looping["id"])["status"] == "running"
    asked = time.monotonic()
    assert api.http.post(f"/v1/jobs/{looping['id']}/cancel").status_code in (200, 202)
    done = api.wait_for(looping["id"], is_terminal, timeout=30, on_timeout=lambda: service.log_tail("worker"))
    latency = time.monotonic() - asked
    assert done["status"] == "cancelled", done
    assert latency < 10, f"the cancel took {latency:.1f} s"

    following = _job(api, _model(api, tmp_path, scripted_bytes(Benign())), clean_id, FAST)
    finished = api.wait_for(following["id"], is_terminal, timeout=180, on_timeout=lambda: service.log_tail("worker"))
    assert finished["status"] == "succeeded", finished
    print(f"e2e: a looping model's job cancelled in {latency:.2f} s; the next job succeeded")


def test_a_model_that_reads_a_worker_file_gets_nothing_out(embedded: tuple[Service, Api], tmp_path: Path) -> None:
    service, api = embedded
    secret = tmp_path / "worker-credentials"
    secret.write_bytes(b"TOPSECRET-worker-key-material")
    job = _job(api, _model(api, tmp_path, scripted_bytes(FileReader(str(secret)))), _clean(api), FAST)
    done = api.wait_for(job["id"], is_terminal, timeout=120, on_timeout=lambda: service.log_tail("worker"))
    assert done["status"] == "failed", done
    assert done["error"]["type"].endswith("invalid-input"), done["error"]
    assert b"TOPSECRET" not in api.http.get(f"/v1/jobs/{job['id']}").content
    assert api.http.get(f"/v1/jobs/{job['id']}/model").status_code != 200
    scratch = tmp_path / "var" / "scratch"
    assert not scratch.exists() or not any(p.name == job["id"] for p in scratch.iterdir())
