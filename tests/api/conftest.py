"""An app per test on the real databases (SQLite file or PostgreSQL, migrated by Alembic),
a local artifact folder, tiny models and NPZ datasets, and tenants with API keys."""

from __future__ import annotations

import io
import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.core.auth import create_api_key, create_org
from api.core.models import Artifact
from api.core.settings import Settings
from api.main import create_app
from defense_core.loading import save_safetensors
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

SPEC: dict[str, Any] = {
    "arch": "small_cnn",
    "num_classes": 4,
    "in_channels": 1,
    "input_size": [16, 16],
    "mean": [0.5],
    "std": [0.25],
}


@dataclass(frozen=True)
class Tenant:
    name: str
    org_id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    settings: Settings

    def session(self) -> Session:
        return self.app.state.session_factory()

    def metrics_text(self) -> str:
        """GET /metrics as a client on the loopback address (the default rule without a token)."""
        local = TestClient(self.app, client=("127.0.0.1", 50000))
        response = local.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    def tenant(self, label: str = "org", *, scopes: tuple[str, ...] = ("read", "write")) -> Tenant:
        name = f"{label}-{secrets.token_hex(4)}"
        with self.session() as session:
            org = create_org(session=session, name=name)
            _, raw = create_api_key(session=session, org_name=name, scopes=scopes)
            session.commit()
            return Tenant(name=name, org_id=org.id, key=raw)

    # -- uploads ------------------------------------------------------------------------
    def upload_model(self, tenant: Tenant, content: bytes, *, spec: dict[str, Any] | str | None = None,
                     filename: str = "model.safetensors") -> Any:
        spec_text = json.dumps(SPEC if spec is None else spec) if not isinstance(spec, str) else spec
        return self.client.post(
            "/v1/models", headers=tenant.headers,
            files={"file": (filename, content, "application/octet-stream")},
            data={"spec": spec_text},
        )

    def upload_dataset(self, tenant: Tenant, content: bytes, *, role: str,
                       filename: str = "data.npz") -> Any:
        return self.client.post(
            "/v1/datasets", headers=tenant.headers,
            files={"file": (filename, content, "application/octet-stream")},
            data={"role": role},
        )

    # -- what is left behind -------------------------------------------------------------
    def stored_files(self) -> list[Path]:
        root = self.settings.local_store_root()
        return sorted(p for p in root.rglob("*") if p.is_file())

    def artifact_rows(self, tenant: Tenant) -> int:
        with self.session() as session:
            return int(session.scalar(
                select(func.count()).select_from(Artifact).where(Artifact.org_id == tenant.org_id)
            ))


def _make_api(settings: Settings) -> Iterator[Api]:
    app = create_app(settings, migrate=False)  # the fixtures' databases are already migrated
    with TestClient(app) as client:
        yield Api(app=app, client=client, settings=settings)


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Iterator[Api]:
    """The same test against the embedded SQLite database and the real PostgreSQL."""
    if request.param == "postgresql":
        settings = settings_factory(database_url=request.getfixturevalue("postgres_url"))
    else:
        settings = settings_factory()
    yield from _make_api(settings)


@pytest.fixture
def sqlite_api(settings_factory: Callable[..., Settings]) -> Iterator[Api]:
    """SQLite only, for tests whose logic does not depend on the database."""
    yield from _make_api(settings_factory())


@pytest.fixture
def api_factory(settings_factory: Callable[..., Settings]) -> Callable[..., Iterator[Api]]:
    """``with contextlib.contextmanager(api_factory)(**settings_overrides) as api``."""

    def make(**overrides: Any) -> Iterator[Api]:
        yield from _make_api(settings_factory(**overrides))

    return make


# -- files ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small_cnn (4 classes, 1x16x16) as safetensors."""
    torch.manual_seed(0)
    model = create_model(ModelSpec.from_dict(SPEC))
    path = tmp_path_factory.mktemp("model") / "small_cnn.safetensors"
    save_safetensors(model.state_dict(), path)
    return path.read_bytes()


def npz_bytes(*, n: int = 12, num_classes: int = 4, size: int = 16, channels: int = 1,
              labels: np.ndarray | None = None, target: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)  # NHWC
    y = labels if labels is not None else np.arange(n, dtype=np.int64) % num_classes
    arrays: dict[str, np.ndarray] = {"x": x, "y": y}
    if target is not None:
        keep = y != target
        arrays = {"x": x[keep], "y": y[keep], "target": np.array(target, dtype=np.int64)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
