"""`cleanroom admin`: organizations, API keys and database migrations.

Reads the database URL from the service settings (``DATABASE_URL`` or
``CLEANROOM_DATABASE_URL``; default SQLite under ``./var``). Errors print one line
to stderr and exit with status 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

admin_app = typer.Typer(
    name="admin",
    help="Administer organizations, API keys and the database.",
    no_args_is_help=True,
    add_completion=False,
)


def register(app: typer.Typer) -> None:
    """Add ``cleanroom admin ...`` to the root command."""
    app.add_typer(admin_app, name="admin")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


@contextmanager
def _session() -> Iterator[object]:
    """A committed-on-success session on the configured database, errors as one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from api.core.db import make_engine, make_session_factory, session_scope
    from api.core.errors import DomainError
    from api.core.settings import Settings

    settings = Settings()
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    except DomainError as error:
        raise _fail(error.detail) from None
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        raise _fail(
            f"database error ({reason}); is the database migrated? run 'cleanroom admin migrate'"
        ) from None
    finally:
        engine.dispose()


@admin_app.command("create-org")
def create_org(name: Annotated[str, typer.Argument(help="Organization name (unique).")]) -> None:
    """Create an organization."""
    from api.core import auth

    with _session() as session:
        org = auth.create_org(session=session, name=name)
        org_id, org_name = org.id, org.name
    typer.echo(f"created organization {org_name} ({org_id})")


@admin_app.command("set-org")
def set_org(
    name: Annotated[str, typer.Argument(help="Organization name.")],
    allow_code_models: Annotated[
        bool | None,
        typer.Option("--allow-code-models/--no-allow-code-models",
                     help="Accept models that carry code (TorchScript, torch.export) from this organization."),
    ] = None,
) -> None:
    """Change an organization's settings (shown after the change)."""
    from api.core import repositories as repo

    with _session() as session:
        org = repo.get_org_by_name(session=session, name=name)
        if org is None:
            raise _fail(f"organization {name!r} does not exist")
        if allow_code_models is not None:
            org.allow_code_models = allow_code_models
        allowed = org.allow_code_models
    typer.echo(f"organization {name}: allow_code_models={'yes' if allowed else 'no'}")


@admin_app.command("create-key")
def create_key(
    org_name: Annotated[str, typer.Argument(help="Organization the key belongs to.")],
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "default",
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="Scope to grant (repeatable): read, write. Default: both."),
    ] = None,
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", min=1, help="Expire after N days.")
    ] = None,
) -> None:
    """Create an API key. The key is printed ONCE, as the last word of the last line."""
    from datetime import timedelta

    from api.core import auth
    from api.core.models import utcnow

    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with _session() as session:
        key, raw_key = auth.create_api_key(
            session=session,
            org_name=org_name,
            name=name,
            scopes=scope or auth.DEFAULT_SCOPES,
            expires_at=expires_at,
        )
        prefix, scopes = key.prefix, key.scopes
    typer.echo(f"created key {name!r} prefix={prefix} scopes={','.join(scopes)}"
               + (f" expires={expires_at.isoformat()}" if expires_at else ""))
    typer.echo("store it now, it cannot be shown again:")
    typer.echo(raw_key)


@admin_app.command("revoke-key")
def revoke_key(
    prefix: Annotated[str, typer.Argument(help="The key's 8-character prefix.")],
) -> None:
    """Revoke an API key (idempotent)."""
    from api.core import auth

    with _session() as session:
        key = auth.revoke_api_key(session=session, prefix=prefix)
        revoked_at = key.revoked_at
    typer.echo(f"revoked key {prefix} at {revoked_at.isoformat() if revoked_at else '?'}")


@admin_app.command("migrate")
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply the database migrations (alembic upgrade head) to the configured database."""
    from sqlalchemy.exc import SQLAlchemyError

    from api.core.db import upgrade_database
    from api.core.settings import Settings

    settings = Settings()
    try:
        upgrade_database(settings.database_url, revision=revision)
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        raise _fail(f"migration failed: {reason}") from None
    typer.echo(f"database migrated to {revision}")


@admin_app.command("sandbox-check")
def sandbox_check() -> None:
    """Start a contained child and report what this host enforces on it.

    The child tries to read a file outside its scratch directory, write /tmp,
    connect to the database and broker ports, start a program and list its
    environment; each line says whether it was stopped. Exits 1 when anything
    got through.
    """
    import tempfile
    from pathlib import Path

    from defense_core.sandbox import Limits, run_contained

    outside = Path(tempfile.mkdtemp(prefix="cleanroom-check-"))
    secret = outside / "secret"
    secret.write_text("not for the child")
    scratch = outside / "scratch"
    scratch.mkdir()
    try:
        outcome = run_contained(
            "probe",
            {"read": [str(secret), "/etc/passwd"], "write": [str(outside / "written"), "/tmp/cleanroom-check"],
             "connect": [["127.0.0.1", 5432], ["127.0.0.1", 6379]], "exec": ["/bin/true"], "env": True},
            scratch=scratch, limits=Limits(wall_seconds=120),
        )
    finally:
        import shutil

        shutil.rmtree(outside, ignore_errors=True)
    confinement, result = outcome.confinement, outcome.result
    typer.echo(f"landlock ABI {confinement.get('landlock_abi', 0)}; seccomp "
               f"{'on' if confinement.get('seccomp') else 'off'}; rlimits {confinement.get('rlimits')}")
    for line in confinement.get("landlock", []):
        typer.echo(f"  enforced: {line}")
    for line in confinement.get("missing", []):
        typer.echo(f"  NOT enforced: {line}")
    leaks = []
    for kind in ("read", "write", "connect"):
        for target, verdict in result.get(kind, {}).items():
            typer.echo(f"  {kind} {target}: {verdict}")
            if verdict == "ok":
                leaks.append(f"{kind} {target}")
    typer.echo(f"  exec /bin/true: {result.get('exec')}")
    if result.get("exec") == "ok":
        leaks.append("exec")
    secrets_seen = [name for name in result.get("env", []) if name not in _child_env_names()]
    typer.echo(f"  environment: {', '.join(result.get('env', []))}")
    if secrets_seen:
        leaks.append(f"environment {secrets_seen}")
    if leaks or confinement.get("missing"):
        raise _fail(f"not contained on this host: {'; '.join(leaks + confinement.get('missing', []))}")
    typer.echo("contained: nothing got through")


def _child_env_names() -> frozenset[str]:
    """The names a child's environment may hold: what the supervisor passes, and TMPDIR."""
    from defense_core.sandbox import child_env
    from defense_core.sandbox.limits import PASSED_ENV

    return frozenset(child_env(1)) | frozenset(PASSED_ENV) | {"TMPDIR", "LC_CTYPE"}
