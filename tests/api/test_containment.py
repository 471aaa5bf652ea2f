"""Model uploads that carry hostile code: refused, and nothing they try reaches the API's host.

Real TorchScript archives (tests/hostile_models.py) uploaded over the app; the
validation runs in a contained child, so the files they aim at stay untouched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api.conftest import Api
from tests.hostile_models import SPEC, Allocator, Benign, FileReader, FileWriter, Looper, SetStateWriter, scripted_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def contained_api(api_factory: Callable[..., object]) -> Api:
    with contextlib.contextmanager(api_factory)(model_validation_timeout_s=10) as api:
        yield api


def _target(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\0" * 64)
    return path


def _assert_left_nothing(api: Api, tenant: object) -> None:
    assert api.artifact_rows(tenant) == 0
    assert api.stored_files() == []
    scratch = api.settings.scratch_path
    assert not scratch.exists() or list(scratch.iterdir()) == []
    staging = api.settings.data_dir / "uploads"
    assert not staging.exists() or list(staging.iterdir()) == []


@pytest.mark.parametrize("make", [FileWriter, SetStateWriter], ids=["forward", "setstate"])
def test_a_model_that_writes_a_host_file_is_refused_and_writes_nothing(contained_api: Api, tmp_path: Path,
                                                                        make: type) -> None:
    target = _target(tmp_path, "host-file.bin")
    tenant = contained_api.tenant()
    response = contained_api.upload_model(tenant, scripted_bytes(make(str(target))), spec=SPEC, filename="m.pt")
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/forbidden-operator")
    assert response.json()["operator"] == "aten::from_file"
    assert target.read_bytes() == b"\0" * 64  # not one byte changed
    _assert_left_nothing(contained_api, tenant)


def test_a_model_that_reads_a_host_file_is_refused(contained_api: Api, tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    secret.write_bytes(b"TOPSECRET-do-not-leak")
    tenant = contained_api.tenant()
    response = contained_api.upload_model(tenant, scripted_bytes(FileReader(str(secret))), spec=SPEC,
                                          filename="m.pt")
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/forbidden-operator") and "aten::from_file" in response.json()["detail"]
    assert b"TOPSECRET" not in response.content
    _assert_left_nothing(contained_api, tenant)


def test_a_model_that_never_returns_is_refused_within_the_bound(contained_api: Api) -> None:
    tenant = contained_api.tenant()
    started = time.monotonic()
    response = contained_api.upload_model(tenant, scripted_bytes(Looper()), spec=SPEC, filename="m.pt")
    waited = time.monotonic() - started
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/resource-limit")
    assert waited < contained_api.settings.model_validation_timeout_s + 8
    _assert_left_nothing(contained_api, tenant)
    # the API is not held: the next upload is validated and stored
    accepted = contained_api.upload_model(tenant, scripted_bytes(Benign()), spec=SPEC, filename="ok.pt")
    assert accepted.status_code == 201, accepted.text


def test_a_model_that_allocates_a_gibibyte_is_refused(contained_api: Api) -> None:
    tenant = contained_api.tenant()
    response = contained_api.upload_model(tenant, scripted_bytes(Allocator()), spec=SPEC, filename="m.pt")
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/resource-limit")
    assert "memory" in response.json()["detail"]
    _assert_left_nothing(contained_api, tenant)


def test_problem_details_carry_no_memory_addresses_or_traces(contained_api: Api, tmp_path: Path) -> None:
    tenant = contained_api.tenant()
    response = contained_api.upload_model(tenant, scripted_bytes(FileWriter(str(_target(tmp_path, "t")))),
                                          spec=SPEC, filename="m.pt")
    detail = response.json()["detail"]
    assert "0x" not in detail and "Traceback" not in detail and "\n" not in detail, detail


def test_code_carrying_models_can_be_refused_per_organization_and_per_service(
        contained_api: Api, api_factory: Callable[..., object]) -> None:
    from api.core.models import Organization

    tenant = contained_api.tenant()
    assert contained_api.upload_model(tenant, scripted_bytes(Benign()), spec=SPEC).status_code == 201
    with contained_api.session() as session:
        session.get(Organization, tenant.org_id).allow_code_models = False
        session.commit()
    refused = contained_api.upload_model(tenant, scripted_bytes(Benign()), spec=SPEC)
    assert refused.status_code == 422 and refused.json()["type"].endswith("/code-models-refused")
    with contextlib.contextmanager(api_factory)(allow_code_models=False) as strict:
        other = strict.tenant()
        refused = strict.upload_model(other, scripted_bytes(Benign()), spec=SPEC)
        assert refused.status_code == 422 and refused.json()["type"].endswith("/code-models-refused")
