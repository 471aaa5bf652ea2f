"""Rows for the worker's state-machine tests, on the real (migrated) PostgreSQL."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.core.db import make_engine, make_session_factory, session_scope
from api.core.models import Artifact, Job, Organization
from tests.api.conftest import api_factory  # noqa: F401  (a fixture the worker tests share with the API tests)


@pytest.fixture(scope="module")
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


def _artifact(org_id: uuid.UUID, *, kind: str, role: str | None) -> Artifact:
    artifact_id = uuid.uuid4()
    return Artifact(
        id=artifact_id,
        org_id=org_id,
        kind=kind,
        role=role,
        format="npz" if kind == "dataset" else "safetensors",
        filename=f"{kind}.bin",
        size=10,
        sha256="0" * 64,
        storage_key=f"orgs/{org_id}/artifacts/{artifact_id}",
        meta={},
    )


@pytest.fixture
def make_job(session_factory: sessionmaker[Session]) -> Callable[..., uuid.UUID]:
    """``make_job(**job_fields) -> job_id``: a job of a fresh organization, committed."""

    def make(**fields: Any) -> uuid.UUID:
        with session_scope(session_factory) as session:
            org = Organization(name=f"org-{secrets.token_hex(6)}")
            session.add(org)
            session.flush()
            model = _artifact(org.id, kind="model", role=None)
            clean = _artifact(org.id, kind="dataset", role="clean")
            session.add_all([model, clean])
            session.flush()
            job = Job(org_id=org.id, defense="tsbd", params={}, model_id=model.id, clean_dataset_id=clean.id, **fields)
            session.add(job)
            session.flush()
            return job.id

    return make
