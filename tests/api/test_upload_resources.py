"""Dataset uploads are bounded in what the API process holds, and running short is not the
uploader's fault.

- An archive of ~100,000 tiny members (under a MB compressed) is refused with a 4xx that
  names the reason, the API process's mappings and RSS are back where they were, and the
  next upload is accepted.
- A pixel flood (a few hundred 1024x1024 PNGs of a few KB) is a 413 before decoding.
- Memory or file handles running out while a dataset is read is a retryable 503
  ``service-unavailable`` problem (``retry_after_s``), never a 4xx, and the API serves the
  same upload once resources are back. The served app runs as a real ``uvicorn`` process
  whose address space is cut with ``prlimit`` while it reads.
"""

from __future__ import annotations

import gc
import io
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from api.core.errors import OutOfResources
from api.core.models import DatasetRole
from api.core.services import artifacts as artifact_service
from api.core.settings import Settings
from tests.api.conftest import Api, npz_bytes
from tests.api.test_uploads import PROBLEM, assert_problem
from tests.unit.test_data_bounds import (
    MALLOC_ENV,
    SLACK,
    images_and_other_files,
    png,
    sampled_usage,
    write_archive,
)

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / MIB


def _warm(api: Api, tenant: Any, tmp_path: Path) -> None:
    """What the first uploads of a served app import and allocate once, done beforehand."""
    assert api.upload_dataset(tenant, npz_bytes(), role="clean").status_code == 201
    folder = write_archive(tmp_path / "warm.zip", ((f"c{i % 2}/{i}.png", png((4, 4))) for i in range(8)))
    response = api.upload_dataset(tenant, folder.read_bytes(), role="clean", filename="warm.zip")
    assert response.status_code == 201, response.text
    gc.collect()


@pytest.mark.parametrize("count", [20_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_many_member_archive_is_refused_and_the_process_is_as_before(
    sqlite_api: Api, tmp_path: Path, count: int
) -> None:
    archive = write_archive(tmp_path / "many.tar.gz", images_and_other_files(count))
    assert archive.stat().st_size < 1024 * 1024
    tenant = sqlite_api.tenant()
    _warm(sqlite_api, tenant, tmp_path)
    rss_before = _rss_mb()
    with sampled_usage() as usage:
        response = sqlite_api.upload_dataset(tenant, archive.read_bytes(), role="clean",
                                             filename="many.tar.gz")
    body = assert_problem(response, 422, "unsafe-archive")
    assert "class1/readme.txt: only PNG and JPEG images are accepted" in body["detail"]
    assert usage.maps_peak - usage.maps_before <= SLACK, usage
    assert usage.maps_after - usage.maps_before <= SLACK, usage
    assert usage.fds_after == usage.fds_before, usage
    assert _rss_mb() - rss_before < 64, (rss_before, _rss_mb())
    again = sqlite_api.upload_dataset(tenant, npz_bytes(seed=5), role="test")
    assert again.status_code == 201, again.text
    assert sqlite_api.artifact_rows(tenant) == 3  # the two warm-ups and this one


def test_pixel_flood_is_413_before_decoding(sqlite_api: Api, tmp_path: Path) -> None:
    black = png((1024, 1024, 3))
    flood = write_archive(tmp_path / "flood.zip", ((f"c{i % 3}/{i}.png", black) for i in range(300)))
    assert flood.stat().st_size < 200_000  # ~900 MiB once decoded
    tenant = sqlite_api.tenant()
    _warm(sqlite_api, tenant, tmp_path)
    rss_before = _rss_mb()
    response = sqlite_api.upload_dataset(tenant, flood.read_bytes(), role="clean", filename="flood.zip")
    body = assert_problem(response, 413, "payload-too-large")
    assert "limit for decoded images" in body["detail"] and "before decoding" in body["detail"]
    assert _rss_mb() - rss_before < 32, (rss_before, _rss_mb())
    assert sqlite_api.upload_dataset(tenant, npz_bytes(), role="clean").status_code == 201


# ------------------------------------------------------------------ running short of resources


def test_file_handles_running_out_while_reading_is_out_of_resources(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes())
    probe = os.dup(0)
    os.close(probe)  # the lowest free descriptor: with the limit at it, no file can be opened
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        with pytest.raises(OutOfResources) as caught:
            artifact_service.inspect_dataset(path, role=DatasetRole.CLEAN)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    error = caught.value
    assert error.__context__ is None and error.__cause__ is None  # nothing of the failed read kept
    problem = error.to_problem()
    assert problem["status"] == 503 and problem["type"] == "service-unavailable"
    assert problem["short_of"] == "file-handles" and problem["retry_after_s"] > 0
    assert "try again later" in problem["detail"]
    assert artifact_service.inspect_dataset(path, role=DatasetRole.CLEAN).num_samples == 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _create_key(database_url: str) -> str:
    from api.core.auth import create_api_key, create_org
    from api.core.db import make_engine, make_session_factory, session_scope

    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            create_org(session=session, name="resources")
            _, raw = create_api_key(session=session, org_name="resources")
            return raw
    finally:
        engine.dispose()


@pytest.fixture
def served_api(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``uvicorn api.main:app`` with the embedded defaults under ``tmp_path``.

    One malloc arena and large blocks always from mmap (given back on free), so an
    address-space limit fails the first large allocation whatever the heap holds.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    env.update(PYTHONUNBUFFERED="1", CLEANROOM_DATA_DIR=str(tmp_path / "var"), **MALLOC_ENV)
    port = _free_port()
    log = tmp_path / "api.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield base_url, process, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


@pytest.mark.slow
def test_memory_running_out_while_reading_is_a_retryable_503_and_the_api_recovers(
    served_api: tuple[str, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    base_url, process, log = served_api
    key = _create_key(Settings(data_dir=tmp_path / "var").database_url)
    # One image of x is 24 MiB as float64 (1024x1024x3): reading it takes one 24 MiB block.
    buffer = io.BytesIO()
    np.savez(buffer, x=np.full((1, 1024, 1024, 3), 0.5), y=np.array([0]))
    big = buffer.getvalue()
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:

        def upload(content: bytes) -> httpx.Response:
            return client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"role": "clean"})

        assert upload(npz_bytes()).status_code == 201
        assert upload(big).status_code == 201, log.read_text()[-3000:]
        served = psutil.Process(process.pid)
        soft, hard = served.rlimit(psutil.RLIMIT_AS)
        served.rlimit(psutil.RLIMIT_AS, (served.memory_info().vms + 12 * MIB, hard))
        try:
            response = upload(big)
        finally:
            served.rlimit(psutil.RLIMIT_AS, (soft, hard))
        assert response.status_code == 503, (response.text, log.read_text()[-3000:])
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == PROBLEM + "service-unavailable"
        assert problem["short_of"] == "memory" and problem["retry_after_s"] > 0
        assert response.headers["retry-after"] == str(problem["retry_after_s"])
        assert "nothing is wrong with the upload" in problem["detail"]
        # Retried once memory is back, the same upload is accepted; the process is fine.
        assert upload(big).status_code == 201
        assert upload(npz_bytes(seed=3)).status_code == 201
        assert client.get("/healthz").status_code == 200
    assert process.poll() is None
