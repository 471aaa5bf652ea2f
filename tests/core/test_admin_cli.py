from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from api.core.auth import authenticate
from api.core.db import make_engine, make_session_factory
from api.core.errors import Unauthorized
from cli.main import app


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> Callable[..., Result]:
    monkeypatch.delenv("CLEANROOM_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["admin", *args])

    return invoke


def test_org_and_key_lifecycle(run: Callable[..., Result], sqlite_url: str) -> None:
    assert run("create-org", "acme").exit_code == 0

    duplicate = run("create-org", "acme")
    assert duplicate.exit_code == 1
    assert duplicate.output.strip().splitlines() == ["error: organization 'acme' already exists"]

    created = run("create-key", "acme", "--name", "ci", "--scope", "read")
    assert created.exit_code == 0, created.output
    raw_key = created.output.strip().splitlines()[-1].split()[-1]
    assert raw_key.startswith("cr_")

    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            key = authenticate(session=session, raw_key=raw_key)
            assert (key.org.name, key.name, key.scopes) == ("acme", "ci", ["read"])
            prefix = key.prefix

        assert run("revoke-key", prefix).exit_code == 0
        with make_session_factory(engine)() as session, pytest.raises(Unauthorized, match="revoked"):
            authenticate(session=session, raw_key=raw_key)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create-key", "ghost"), "error: organization 'ghost' does not exist"),
        (("revoke-key", "abcdefgh"), "error: no API key with prefix 'abcdefgh'"),
        (("create-key", "acme", "--scope", "root"), "error: unknown scope(s) ['root']"),
    ],
)
def test_errors_are_one_line(
    run: Callable[..., Result], args: tuple[str, ...], message: str
) -> None:
    run("create-org", "acme")
    result = run(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)


def test_migrate_builds_an_empty_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'cleanroom.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    result = CliRunner().invoke(app, ["admin", "migrate"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["admin", "create-org", "fresh"]).exit_code == 0


def test_unmigrated_database_gives_a_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    result = CliRunner().invoke(app, ["admin", "create-org", "x"])
    assert result.exit_code == 1
    assert "cleanroom admin migrate" in result.output


@pytest.mark.skipif(not __import__("defense_core.sandbox.confine", fromlist=["x"]).landlock_abi() >= 4,
                    reason="full containment needs Landlock ABI 4 (Linux 6.7)")
def test_sandbox_check_reports_what_the_host_enforces(run: Callable[..., Result], monkeypatch) -> None:
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "hunter2")  # a credential the child must not see
    result = run("sandbox-check")
    assert result.exit_code == 0, result.output
    assert "contained: nothing got through" in result.output
    assert "S3_SECRET_ACCESS_KEY" not in result.output
    assert result.output.count(": denied") == 7
