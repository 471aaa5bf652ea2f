"""`cleanroom serve`: the API and a Celery worker together, with embedded defaults.

With no environment set, everything lives under ``--data-dir``: a SQLite
database, the filesystem broker and the artifact folder. Migrations run first;
Ctrl-C (or SIGTERM) stops both processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import typer

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    data_dir: Path
    workers: int
    log_level: str

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be in 1..64, got {self.workers}")


def child_environment(options: ServeOptions) -> dict[str, str]:
    """The environment of the API and worker processes (the data dir and concurrency pinned)."""
    env = dict(os.environ)
    env["CLEANROOM_DATA_DIR"] = str(options.data_dir)
    env["CLEANROOM_WORKER_CONCURRENCY"] = str(options.workers)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def api_command(options: ServeOptions) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "api.main:app",
        "--host", options.host, "--port", str(options.port),
        "--log-level", options.log_level.lower(), "--no-access-log",
        "--http", "api.http_protocol:ProblemH11Protocol",
    ]


def worker_command(options: ServeOptions) -> list[str]:
    from api.core.queue import QUEUE_NAME

    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--loglevel", options.log_level.upper(),
        "--concurrency", str(options.workers),
        "--queues", QUEUE_NAME,
        "--hostname", "cleanroom@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]


def _stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, STOP_GRACE_S)
        process.kill()
        process.wait(timeout=5)


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> bool:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def serve(options: ServeOptions) -> int:
    """Run until interrupted or until one of the two processes exits; returns an exit code."""
    env = child_environment(options)
    os.environ.update({k: env[k] for k in ("CLEANROOM_DATA_DIR", "CLEANROOM_WORKER_CONCURRENCY")})
    from api.core.db import upgrade_database
    from api.core.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    upgrade_database(settings.database_url)
    log.info("database migrated; settings: %s", settings.safe_dict())

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # own sessions: a terminal's Ctrl-C reaches only us, and we stop the children in order
    worker = subprocess.Popen(worker_command(options), env=env, start_new_session=True)
    api = subprocess.Popen(api_command(options), env=env, start_new_session=True)
    children = {"API": api, "worker": worker}
    code = 0
    try:
        base = f"http://{options.host}:{options.port}"
        if _wait_ready(f"{base}/healthz", api):
            typer.echo(f"cleanroom is serving on {base} (docs: {base}/docs); data in {options.data_dir}")
        while not stopping:
            exited = [name for name, proc in children.items() if proc.poll() is not None]
            if exited:
                typer.echo(f"error: the {exited[0]} process exited; stopping", err=True)
                code = 1
                break
            time.sleep(0.2)
    finally:
        _stop(api, "API")
        _stop(worker, "worker")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        host: str = typer.Option("127.0.0.1", help="Interface the API listens on."),
        port: int = typer.Option(8000, help="Port of the API."),
        data_dir: Path = typer.Option(
            Path("var"), "--data-dir", help="Folder for the embedded database, broker and artifacts."
        ),
        workers: int = typer.Option(1, help="Worker processes (jobs run in parallel)."),
        log_level: str = typer.Option("INFO", help="Log level of both processes."),
    ) -> None:
        """Run the API and a worker together (embedded defaults: SQLite, filesystem broker, local store)."""
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            options = ServeOptions(
                host=host, port=port, data_dir=data_dir.expanduser().resolve(), workers=workers,
                log_level=log_level,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        raise typer.Exit(serve(options))
