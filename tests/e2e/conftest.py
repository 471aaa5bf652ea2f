"""End-to-end fixtures: a small backdoored model, and the service as real processes.

The model is a ``small_cnn`` trained for a few seconds on scikit-learn's 8x8
digits (upscaled to 16x16) with a BadNets patch poisoning 10 % of the
training images towards class 0, so its attack success rate is high before
the defense. The service runs as subprocesses: ``uvicorn api.main:app`` on a
free port and ``celery -A worker.celery_app worker``, configured only through
the environment, exactly as deployed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {
    "arch": "small_cnn", "num_classes": 10, "in_channels": 1,
    "input_size": [16, 16], "mean": [0.3], "std": [0.35],
}
TRIGGER: dict[str, Any] = {"type": "badnets", "target": 0, "size": 3, "value": 255}


@dataclass(frozen=True)
class Bundle:
    """Files a client would upload, plus the metrics they were built with."""

    model: Path
    clean_model: Path  # the same architecture trained without poisoning (longer: a settled model)
    spec: Path
    clean: Path
    test: Path
    poisoned: Path
    trigger: Path
    ca: float
    asr: float


def _digits_16x16() -> tuple[Any, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images * (255.0 / 16.0)).astype(np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return x, y


def _save_npz(path: Path, imageset: Any) -> Path:
    import numpy as np

    arrays = {"x": imageset.x.numpy(), "y": imageset.y.numpy()}
    if imageset.target is not None:
        arrays["target"] = imageset.target.numpy()
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    import torch

    from defense_core.attacks import TriggerSpec, make_poisoned_test_set
    from defense_core.imageset import ImageSet
    from defense_core.loading import save_safetensors
    from defense_core.spec import ModelSpec
    from defense_core.training import TrainConfig, accuracy, train_backdoored_model, train_model

    root = tmp_path_factory.mktemp("bundle")
    x, y = _digits_16x16()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, clean_idx, test_idx = order[:1200], order[1200:1400], order[1400:]
    spec = ModelSpec.from_dict(SPEC)
    trigger = TriggerSpec.from_dict(TRIGGER)
    train = ImageSet(x=x[train_idx], y=y[train_idx])
    model = train_backdoored_model(
        spec, train, trigger, ratio=0.1, seed=0,
        config=TrainConfig(epochs=6, lr=0.05, batch_size=64),
    )
    test = ImageSet(x=x[test_idx], y=y[test_idx])
    poisoned = make_poisoned_test_set(test, trigger)
    ca = accuracy(model, test, spec)
    asr = accuracy(model, poisoned, spec, labels=poisoned.target)
    assert ca > 0.85 and asr > 0.9, f"the demo backdoor did not take: CA {ca:.3f}, ASR {asr:.3f}"
    model_path = root / "model.safetensors"
    save_safetensors(model.state_dict(), model_path)
    clean_model = train_model(spec, train, seed=1, config=TrainConfig(epochs=10, lr=0.05, batch_size=64))
    clean_model_path = root / "clean_model.safetensors"
    save_safetensors(clean_model.state_dict(), clean_model_path)
    (root / "spec.json").write_text(json.dumps(SPEC))
    (root / "trigger.json").write_text(json.dumps(TRIGGER))
    return Bundle(
        model=model_path,
        clean_model=clean_model_path,
        spec=root / "spec.json",
        clean=_save_npz(root / "clean.npz", ImageSet(x=x[clean_idx], y=y[clean_idx])),
        test=_save_npz(root / "test.npz", test),
        poisoned=_save_npz(root / "poisoned.npz", poisoned),
        trigger=root / "trigger.json",
        ca=ca,
        asr=asr,
    )


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """API and worker subprocesses sharing one environment (their configuration)."""

    env: dict[str, str]
    logs: Path
    key: str = ""
    port: int = field(default_factory=free_port)
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log_file:
            return subprocess.Popen(
                command, cwd=REPO_ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGKILL reaches the pool too
            )

    def start_api(self) -> None:
        self.api = self._spawn(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning",
             "--http", "api.http_protocol:ProblemH11Protocol"],
            "api",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.api.poll() is None, self.log_tail("api")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the API did not come up:\n{self.log_tail('api')}")

    def start_worker(self) -> subprocess.Popen[bytes]:
        index = len(self.workers)
        worker = self._spawn(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
             "--loglevel", "INFO", "--concurrency", "1", "--queues", "cleanroom",
             "--hostname", f"e2e{index}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            "worker",
        )
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker's whole process group (main process and pool children)."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def stop(self) -> None:
        processes = [p for p in [self.api, *self.workers] if p is not None and p.poll() is None]
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def service_env(tmp: Path, **values: str) -> dict[str, str]:
    """The subprocesses' environment: ours minus any CLEANROOM_* leftovers, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    env.update(
        PYTHONUNBUFFERED="1",
        CLEANROOM_DATA_DIR=str(tmp / "var"),
        # fast failure detection so the crash test finishes quickly
        CLEANROOM_HEARTBEAT_INTERVAL_S="0.5",
        CLEANROOM_HEARTBEAT_STALE_S="3",
        CLEANROOM_PROGRESS_INTERVAL_S="0.2",
    )
    env.update({f"CLEANROOM_{k.upper()}": v for k, v in values.items()})
    return env


def create_api_key(database_url: str) -> str:
    from api.core.auth import create_api_key as make_key
    from api.core.auth import create_org
    from api.core.db import make_engine, make_session_factory, session_scope

    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            name = f"e2e-{os.urandom(4).hex()}"
            create_org(session=session, name=name)
            _, raw = make_key(session=session, org_name=name)
            return raw
    finally:
        engine.dispose()


# -- client helpers ----------------------------------------------------------------------


@dataclass
class Api:
    """A tiny httpx client of the v1 API (what any client would write)."""

    base_url: str
    key: str

    def __post_init__(self) -> None:
        self.http = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )

    def upload_model(self, bundle: Bundle, path: Path | None = None) -> dict[str, Any]:
        with (path or bundle.model).open("rb") as handle:
            response = self.http.post(
                "/v1/models", files={"file": ("model.safetensors", handle)},
                data={"spec": bundle.spec.read_text()},
            )
        assert response.status_code == 201, response.text
        return response.json()

    def upload_dataset(self, path: Path, role: str) -> dict[str, Any]:
        with path.open("rb") as handle:
            response = self.http.post("/v1/datasets", files={"file": (path.name, handle)}, data={"role": role})
        assert response.status_code == 201, response.text
        return response.json()

    def submit(self, bundle: Bundle, *, params: dict[str, Any], use_trigger: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model_id": self.upload_model(bundle)["id"],
            "clean_dataset_id": self.upload_dataset(bundle.clean, "clean")["id"],
            "test_dataset_id": self.upload_dataset(bundle.test, "test")["id"],
            "defense": "tsbd",
            "params": params,
        }
        if use_trigger:
            body["trigger"] = json.loads(bundle.trigger.read_text())
        else:
            body["poisoned_dataset_id"] = self.upload_dataset(bundle.poisoned, "poisoned")["id"]
        response = self.http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of the job, oldest first (following the ``after`` cursor)."""
        items: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.http.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000})
            assert page.status_code == 200, page.text
            body = page.json()
            items += body["items"]
            if not body["items"]:
                return items
            after = body["next_after"]

    def wait_for(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], *, timeout: float,
        on_timeout: Callable[[], str] = lambda: "",
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} stuck at {job}\n{on_timeout()}")


TERMINAL = ("succeeded", "failed", "cancelled")


def is_terminal(job: dict[str, Any]) -> bool:
    return job["status"] in TERMINAL


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """``make_service(**settings) -> Service`` (not started); all stopped at teardown."""
    services: list[Service] = []

    def make(**values: str) -> Service:
        service = Service(env=service_env(tmp_path, **values), logs=tmp_path / "logs")
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()
