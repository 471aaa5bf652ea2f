"""The service end to end, as deployed: PostgreSQL, Redis, an S3 server, a uvicorn
server process and a Celery worker process; the test is an HTTP client.

1. happy path: upload a backdoored model and data, the job succeeds, the attack
   success rate drops, the purified model downloads intact and loads;
2. cancel mid-run: the job ends ``cancelled`` within seconds;
3. SIGKILL of the worker mid-job: a restarted worker finishes the job (or it
   fails with a reason) — it is never left ``running``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SPEC, Api, Bundle, Service, create_api_key, is_terminal, service_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3]

# Few steps: the point is the plumbing, the defense's quality is benchmarked elsewhere.
# (A large unlearning rate reaches chance accuracy in a few steps on 200 images.)
FAST_PARAMS: dict[str, Any] = {
    "seed": 0, "unlearn_lr": 0.01, "unlearn_max_steps": 50, "ft_epochs": 5, "ft_min_steps": 10,
}
# Minutes of fine-tuning: long enough to be interrupted (cancellation is checked every step).
LONG_PARAMS: dict[str, Any] = {**FAST_PARAMS, "ft_epochs": 5000, "ft_min_steps": 5000}
BUSY_STAGES = ("unlearning", "ranking", "reinitializing", "finetuning", "evaluating")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    empty_postgres_database: Any,
    redis_url: str,
    s3_server: dict[str, Any],
) -> Iterator[Service]:
    from api.core.db import upgrade_database

    database_url = empty_postgres_database()  # its own database: no other test's jobs
    upgrade_database(database_url)
    tmp = tmp_path_factory.mktemp("e2e-prod")
    env = service_env(
        tmp,
        database_url=database_url,
        broker_url=redis_url,
        store_url=f"s3://{s3_server['bucket']}/e2e-{secrets.token_hex(4)}",
        s3_endpoint_url=s3_server["endpoint_url"],
        s3_access_key_id=s3_server["access_key"],
        s3_secret_access_key=s3_server["secret_key"],
        s3_region=s3_server["region"],
    )
    svc = Service(env=env, logs=tmp / "logs")
    svc.key = create_api_key(database_url)
    try:
        svc.start_api()
        svc.start_worker()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def api(service: Service) -> Api:
    return Api(base_url=service.base_url, key=service.key)


def _logs(service: Service) -> str:
    return f"--- worker log ---\n{service.log_tail('worker')}\n--- api log ---\n{service.log_tail('api')}"


def test_a_backdoored_model_is_purified_over_http(service: Service, api: Api, bundle: Bundle, tmp_path: Path) -> None:
    started = time.monotonic()
    job = api.submit(bundle, params=FAST_PARAMS)
    assert job["status"] == "queued"
    done = api.wait_for(job["id"], is_terminal, timeout=180, on_timeout=lambda: _logs(service))
    assert done["status"] == "succeeded", f"{done}\n{_logs(service)}"
    assert done["attempts"] == 1 and done["purified_model_id"]

    result = api.http.get(f"/v1/jobs/{job['id']}/result").json()
    before, after = result["metrics"]["before"], result["metrics"]["after"]
    # the engine measured the same backdoor we built
    assert before["asr"] == pytest.approx(bundle.asr, abs=0.02)
    assert before["ca"] == pytest.approx(bundle.ca, abs=0.02)
    assert after["asr"] < before["asr"]
    assert 0.0 <= after["ca"] <= 1.0

    # progress was reported stage by stage, in the documented order
    items = api.events(job["id"])
    stages = [e["stage"] for e in items if e["kind"] == "progress"]
    seen = list(dict.fromkeys(stages))
    assert seen[0] == "loading" and "unlearning" in seen and "finetuning" in seen
    assert seen.index("unlearning") < seen.index("finetuning")
    assert [e["status"] for e in items if e["kind"] == "status"][-1] == "succeeded"

    # the purified model: intact, the advertised digest, loadable by the engine
    response = api.http.get(f"/v1/jobs/{job['id']}/model")
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    assert digest == response.headers["X-Content-SHA256"] == result["model_sha256"]
    path = tmp_path / "purified.safetensors"
    path.write_bytes(response.content)

    from defense_core.data import load_dataset
    from defense_core.loading import load_model
    from defense_core.spec import ModelSpec
    from defense_core.training import accuracy

    spec = ModelSpec.from_dict(SPEC)
    model = load_model(path, spec)
    test = load_dataset(bundle.test)
    poisoned = load_dataset(bundle.poisoned)
    assert accuracy(model, test, spec) == pytest.approx(after["ca"], abs=0.02)
    assert accuracy(model, poisoned, spec, labels=poisoned.target) == pytest.approx(after["asr"], abs=0.02)
    print(f"e2e happy path: {time.monotonic() - started:.1f} s, ASR {before['asr']:.3f} -> {after['asr']:.3f}")


def test_cancel_stops_a_running_job_within_seconds(service: Service, api: Api, bundle: Bundle) -> None:
    job = api.submit(bundle, params=LONG_PARAMS)
    api.wait_for(
        job["id"], lambda j: j["status"] == "running" and j["stage"] in BUSY_STAGES, timeout=90,
        on_timeout=lambda: _logs(service),
    )
    asked = time.monotonic()
    response = api.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code in (200, 202), response.text
    done = api.wait_for(job["id"], is_terminal, timeout=15, on_timeout=lambda: _logs(service))
    latency = time.monotonic() - asked
    assert done["status"] == "cancelled", done
    assert latency < 10, f"cancellation took {latency:.1f} s"
    assert service.workers[-1].poll() is None  # the worker survives and takes the next job
    print(f"e2e cancel latency: {latency:.2f} s")


def test_a_killed_worker_never_leaves_a_job_running(service: Service, api: Api, bundle: Bundle) -> None:
    job = api.submit(bundle, params=FAST_PARAMS)
    api.wait_for(
        job["id"], lambda j: j["status"] == "running" and j["stage"] in BUSY_STAGES, timeout=90,
        on_timeout=lambda: _logs(service),
    )
    service.kill_worker(service.workers[-1])
    killed = time.monotonic()
    assert api.job(job["id"])["status"] == "running"  # nobody has noticed yet
    service.start_worker()
    done = api.wait_for(job["id"], is_terminal, timeout=150, on_timeout=lambda: _logs(service))
    if done["status"] == "succeeded":
        assert done["attempts"] == 2  # re-queued once by the reaper, then completed
    else:
        assert done["status"] == "failed" and done["error"]["type"] == "worker-lost", done
    items = api.events(job["id"])
    messages = [e.get("message") or "" for e in items if e["kind"] == "status"]
    assert any(m.startswith("re-queued") for m in messages), messages
    print(f"e2e recovery after SIGKILL: {done['status']} {time.monotonic() - killed:.1f} s after the kill")
