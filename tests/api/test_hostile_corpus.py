"""The hostile-upload corpus (tests/hostile_corpus.py) against one in-process app.

Every case is uploaded to the same app (embedded SQLite, local store, model validation
bounded at 10 s), so what one case leaves behind is what the next one meets:

- each answer is the expected status with an ``application/problem+json`` body whose
  ``type`` names the reason and whose ``detail`` is one line without a traceback or a
  memory address; nothing is stored, no artifact row is written, nothing is left in the
  staging or scratch folders, payload markers never appear and host secrets never come
  back;
- every few cases, and at the end, the app still answers ``/healthz`` and accepts a valid
  model and a valid dataset;
- the API process (this pytest process: the app runs in it under TestClient) is measured
  before and after the whole corpus: resident memory, memory mappings, open descriptors.

Run alone: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/api/test_hostile_corpus.py -s``
(``-s`` prints a per-case table of outcomes, times and RSS deltas).
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from api.core.settings import Settings
from api.main import create_app
from tests.api.conftest import Api, Tenant
from tests.hostile_corpus import CASES, SECRET, Case, valid_model, valid_npz

pytestmark = pytest.mark.slow

VALIDATION_TIMEOUT_S = 10.0
CHECK_EVERY = 5  # cases between two "still serving" checks
CASE_SECONDS = VALIDATION_TIMEOUT_S + 20  # no case may hold a request longer than this
MAX_RSS_GROWTH_MB = 300
MAX_MAPS_GROWTH = 1000
MAX_FDS_GROWTH = 20
MEMORY_ADDRESS = re.compile(r"(?<![0-9A-Za-z])0x[0-9a-fA-F]{4,}")  # not the x of "100000x100000"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Usage:
    rss_mb: float
    maps: int
    fds: int

    @classmethod
    def now(cls) -> Usage:
        gc.collect()
        with open("/proc/self/maps") as fh:
            maps = sum(1 for _ in fh)
        return cls(rss_mb=psutil.Process().memory_info().rss / MIB, maps=maps,
                   fds=len(os.listdir("/proc/self/fd")))


@dataclass
class Outcome:
    case: Case
    status: int
    type: str
    seconds: float
    rss_delta_mb: float


@dataclass
class Corpus:
    api: Api
    helper: Tenant  # uploads the valid files of the "still serving" checks
    before: Usage
    outcomes: list[Outcome] = field(default_factory=list)
    serving_checks: int = 0


def _still_serving(corpus: Corpus) -> None:
    api = corpus.api
    health = api.client.get("/healthz")
    assert health.status_code == 200, health.text
    model = api.upload_model(corpus.helper, valid_model())
    assert model.status_code == 201, model.text
    dataset = api.upload_dataset(corpus.helper, valid_npz(), role="clean")
    assert dataset.status_code == 201, dataset.text
    corpus.serving_checks += 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Iterator[Corpus]:
    """One app for the whole corpus, warmed up (engine imported, a spare child started).

    Module-scoped, so cases meet what earlier cases left; the client does not re-raise
    server exceptions, so a 500 is seen as the answer a real client would get.
    """
    data_dir = tmp_path_factory.mktemp("hostile-corpus") / "var"
    data_dir.mkdir()
    database = data_dir / "cleanroom.db"
    shutil.copyfile(_sqlite_template, database)
    settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{database}",
                        model_validation_timeout_s=VALIDATION_TIMEOUT_S)
    settings.ensure_dirs()
    app = create_app(settings, migrate=False)  # the template is migrated
    with TestClient(app, raise_server_exceptions=False) as client:
        api = Api(app=app, client=client, settings=settings)
        state = Corpus(api=api, helper=api.tenant("helper"), before=Usage(0, 0, 0))
        _still_serving(state)  # warm-up: what the first uploads import and allocate once
        _still_serving(state)
        state.serving_checks = 0
        state.before = Usage.now()
        yield state


def _post(api: Api, tenant: Tenant, case: Case, content: bytes) -> Any:
    return api.client.post(
        case.endpoint, headers=tenant.headers,
        files={"file": (case.filename, content, "application/octet-stream")},
        data=dict(case.fields),
    )


def _left_behind(settings: Settings) -> list[Path]:
    staging = settings.data_dir / "uploads"
    scratch = settings.scratch_path
    found = list(staging.iterdir()) if staging.exists() else []
    if scratch.exists():
        found += [p for p in scratch.iterdir() if p.name.startswith("upload-")]
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_upload(corpus: Corpus, case: Case, tmp_path: Path) -> None:
    api = corpus.api
    content = case.build(tmp_path)
    tenant = api.tenant("hostile")
    stored_before = api.stored_files()
    rss_before = psutil.Process().memory_info().rss
    started = time.monotonic()
    response = _post(api, tenant, case, content)
    seconds = time.monotonic() - started
    body: dict[str, Any] = {}
    if response.headers.get("content-type", "").endswith("json"):
        body = response.json()
    corpus.outcomes.append(Outcome(
        case=case, status=response.status_code, type=str(body.get("type", "")).rsplit("/", 1)[-1],
        seconds=seconds, rss_delta_mb=(psutil.Process().memory_info().rss - rss_before) / MIB,
    ))
    stored_after, rows = api.stored_files(), api.artifact_rows(tenant)
    left = _left_behind(api.settings)
    if len(corpus.outcomes) % CHECK_EVERY == 0:
        _still_serving(corpus)  # whatever this case's own answer was

    assert seconds < CASE_SECONDS, f"{case.name} held the request {seconds:.1f} s"
    if case.marker is not None:
        assert not (tmp_path / case.marker).exists(), f"{case.name}: the payload ran"
    if case.secret:
        assert SECRET not in response.content
    assert response.status_code == case.status, f"{case.name}: expected {case.expected}, got " \
        f"{response.status_code} {response.text[:300]}"
    if case.accepted:
        assert body["sha256"] == hashlib.sha256(content).hexdigest()
        assert rows == 1 and len(stored_after) == len(stored_before) + 1
        return
    assert response.headers["content-type"] == "application/problem+json"
    assert any(body["type"].endswith(f"/{slug}") for slug in case.slugs), \
        f"{case.name}: expected {case.expected}, got {body['type']}: {body.get('detail')}"
    assert body["status"] == case.status
    detail = body["detail"]
    assert isinstance(detail, str) and detail.strip(), body
    assert "\n" not in detail and "Traceback" not in detail, detail
    assert not MEMORY_ADDRESS.search(detail), detail
    assert stored_after == stored_before
    assert rows == 0
    assert left == []


def test_the_api_process_is_as_before_after_the_corpus(corpus: Corpus) -> None:
    """Runs after the cases (file order): still serving, and no growth of the process."""
    _still_serving(corpus)
    after = Usage.now()
    before = corpus.before
    lines = [f"{'case':40s} {'expected':34s} {'got':28s} {'s':>6s} {'dRSS MiB':>9s}"]
    for o in corpus.outcomes:
        lines.append(f"{o.case.name:40s} {o.case.expected:34s} {f'{o.status} {o.type}':28s} "
                     f"{o.seconds:6.2f} {o.rss_delta_mb:9.1f}")
    lines.append(f"API process before the corpus: RSS {before.rss_mb:.0f} MiB, "
                 f"{before.maps} mappings, {before.fds} fds; after: RSS {after.rss_mb:.0f} MiB, "
                 f"{after.maps} mappings, {after.fds} fds ({len(corpus.outcomes)} cases, "
                 f"{corpus.serving_checks} serving checks)")
    print("\n" + "\n".join(lines))
    assert after.rss_mb - before.rss_mb < MAX_RSS_GROWTH_MB, (before, after)
    assert after.maps - before.maps < MAX_MAPS_GROWTH, (before, after)
    assert after.fds - before.fds < MAX_FDS_GROWTH, (before, after)
