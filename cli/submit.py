"""`cleanroom submit`: upload a model and data over HTTP, create a job, optionally wait.

A thin client of the v1 API (httpx): uploads stream from disk, ``--wait`` polls
``GET /v1/jobs/{id}`` with a progress bar, prints CA/ASR before and after (and the
screening verdict), and ``--out`` downloads the purified model and checks its SHA-256.
``--task`` picks the job kind: ``purify`` (the default: screen, purify, evaluate),
``screen`` (the verdict only) or ``intake`` (screen, purify only a flagged model); the
body names the task only when it is not the default, so a server that predates job
kinds still takes a purification.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

TERMINAL = ("succeeded", "failed", "cancelled")
TASKS = ("purify", "screen", "intake")
DEFAULT_TASK = "purify"
POLL_S = 0.5
UPLOAD_TIMEOUT_S = 600.0


class ApiError(Exception):
    """The API answered with a problem document (or not at all)."""


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v``: ``v`` as JSON when it parses (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"--param expects key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{what} {path} must hold a JSON object")
    return data


@dataclass
class Client:
    """The few API calls the command line needs."""

    base_url: str
    key: str
    _http: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import httpx

        self._http = httpx.Client(
            base_url=self.base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(30.0, read=UPLOAD_TIMEOUT_S, write=UPLOAD_TIMEOUT_S),
        )

    def close(self) -> None:
        self._http.close()

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
                detail = f"{problem.get('title', '')}: {problem.get('detail', '')}"
            except ValueError:
                detail = response.text[:500]
            raise ApiError(f"{response.request.method} {response.request.url.path} -> {response.status_code} {detail}")
        return response

    def upload_model(self, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
        with path.open("rb") as handle:
            response = self._http.post(
                "/v1/models", files={"file": (path.name, handle, "application/octet-stream")},
                data={"spec": json.dumps(spec)},
            )
        return self._check(response).json()

    def upload_dataset(self, path: Path, role: str) -> dict[str, Any]:
        with path.open("rb") as handle:
            response = self._http.post(
                "/v1/datasets", files={"file": (path.name, handle, "application/octet-stream")},
                data={"role": role},
            )
        return self._check(response).json()

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self._http.post("/v1/jobs", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/jobs/{job_id}")).json()

    def result(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/jobs/{job_id}/result")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def download_model(self, job_id: str, out: Path) -> tuple[str, str | None]:
        """Stream the purified model to ``out``; returns (sha256 of the bytes, the server's digest)."""
        digest = hashlib.sha256()
        tmp = out.with_name(out.name + ".part")
        with self._http.stream("GET", f"/v1/jobs/{job_id}/model") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with tmp.open("wb") as handle:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    handle.write(chunk)
            server_digest = response.headers.get("X-Content-SHA256")
        tmp.replace(out)
        return digest.hexdigest(), server_digest


def poll(client: Client, job_id: str, *, interval_s: float = POLL_S) -> Iterator[dict[str, Any]]:
    """Yield the job each poll until it is terminal (the last one yielded is terminal)."""
    while True:
        job = client.job(job_id)
        yield job
        if job["status"] in TERMINAL:
            return
        time.sleep(interval_s)


def wait_with_progress(client: Client, job_id: str, *, quiet: bool) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    job: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.fields[status]:<9}[/] {task.description:<15}"),
        BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(),
        console=console, disable=quiet, transient=False,
    ) as progress:
        bar = progress.add_task("", total=None, status="queued", metrics="")
        for job in poll(client, job_id):
            info = job.get("progress") or {}
            metrics = info.get("metrics") or {}
            shown = " ".join(f"{k}={v:.3f}" for k, v in list(metrics.items())[:3] if isinstance(v, (int, float)))
            progress.update(
                bar, description=job.get("stage") or "", total=info.get("total"),
                completed=info.get("step") or 0, status=job["status"], metrics=shown,
            )
    return job


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):6.2f}%"


def screening_lines(report: dict[str, Any] | None) -> list[str]:
    """The verdict of a ScreeningReport, as one printable line."""
    if not report:
        return []
    target = "-" if report.get("target") is None else report["target"]
    return [f"screening: {report.get('verdict')} (score {float(report.get('score', 0.0)):.3f}, target {target})"]


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The screening verdict, the intake's decision and before/after CA, ASR and RA of a
    result document (a ScreeningReport for a screening job), as printable lines."""
    if "verdict" in result:  # a screening job's result is the report itself
        return screening_lines(result)
    lines = screening_lines(result.get("screening"))
    decision = result.get("decision")
    if decision:
        lines.append(f"decision: {'purified' if decision.get('purified') else 'not purified'}: "
                     f"{decision.get('reason', '')}")
    metrics = result.get("metrics")
    if not metrics:
        return lines
    lines.append(f"{'':14}{'CA':>9}{'ASR':>9}{'RA':>9}")
    for name in ("before", "after_stage1", "after"):
        row = metrics.get(name)
        if row:
            lines.append(f"{name:<14}{_pct(row.get('ca')):>9}{_pct(row.get('asr')):>9}{_pct(row.get('ra')):>9}")
    if result.get("der") is not None:
        lines.append(f"DER {100 * result['der']:.2f}%")
    return lines


def register(app: typer.Typer) -> None:
    @app.command("submit")
    def submit_command(
        model: Path = typer.Option(..., exists=True, dir_okay=False, help=(
            "Model file (safetensors / state dict / TorchScript).")),
        spec: Path = typer.Option(..., exists=True, dir_okay=False, help="Model spec JSON."),
        clean: Path = typer.Option(..., exists=True, dir_okay=False, help="Clean defense data (NPZ or archive)."),
        task: str = typer.Option(DEFAULT_TASK, help=(
            "Job kind: purify (screen, purify, evaluate), screen (the verdict only: no --test, "
            "--poisoned, --trigger or --out; --param sets screening options), or intake (screen, "
            "then purify only a flagged model).")),
        api: str = typer.Option("http://127.0.0.1:8000", envvar="CLEANROOM_API_URL", help="API base URL."),
        key: str = typer.Option(..., envvar="CLEANROOM_API_KEY", help="API key (or CLEANROOM_API_KEY)."),
        test: Path | None = typer.Option(None, exists=True, dir_okay=False, help="Clean test data (CA)."),
        poisoned: Path | None = typer.Option(None, exists=True, dir_okay=False, help="Poisoned test data (ASR)."),
        trigger: Path | None = typer.Option(None, exists=True, dir_okay=False, help=(
            "Trigger spec JSON (instead of --poisoned).")),
        defense: str = typer.Option("tsbd", help="tsbd or ft."),
        param: list[str] = typer.Option([], "--param", help="Defense parameter key=value (repeatable)."),
        idempotency_key: str | None = typer.Option(None, help="Idempotency-Key of the job creation."),
        wait: bool = typer.Option(False, "--wait", help="Wait for the job and show progress."),
        out: Path | None = typer.Option(None, help="Where to save the purified model (implies --wait)."),
        as_json: bool = typer.Option(False, "--json", help="Print the job (and result) as JSON on stdout."),
    ) -> None:
        """Upload a model and data, create a job (purify, screen or intake), optionally wait for it."""
        if task not in TASKS:
            raise typer.BadParameter(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
        if task == "screen":
            given = [flag for flag, value in (("--test", test), ("--poisoned", poisoned), ("--trigger", trigger),
                                              ("--out", out)) if value is not None]
            if given:
                raise typer.BadParameter(f"a screening takes the model and clean data only: drop {', '.join(given)}")
        if poisoned is not None and trigger is not None:
            raise typer.BadParameter("give --poisoned or --trigger, not both")
        params = dict(parse_param(p) for p in param)
        model_spec = _read_json(spec, "model spec")
        trigger_spec = _read_json(trigger, "trigger spec") if trigger else None
        wait = wait or out is not None
        say = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
        client = Client(base_url=api, key=key)
        try:
            model_row = client.upload_model(model, model_spec)
            say(f"model    {model_row['id']}  sha256 {model_row['sha256'][:16]}…")
            body: dict[str, Any] = {"model_id": model_row["id"], "params": params}
            if task != "screen":  # a screening has no defense
                body["defense"] = defense
            if task != DEFAULT_TASK:
                body["task"] = task
            for role, path, field_name in (
                ("clean", clean, "clean_dataset_id"), ("test", test, "test_dataset_id"),
                ("poisoned", poisoned, "poisoned_dataset_id"),
            ):
                if path is not None:
                    row = client.upload_dataset(path, role)
                    say(f"{role:<8} {row['id']}  {path.name}")
                    body[field_name] = row["id"]
            if trigger_spec is not None:
                body["trigger"] = trigger_spec
            job = client.create_job(body, idempotency_key=idempotency_key)
            say(f"job      {job['id']}  {job['status']}")
            if not wait:
                if as_json:
                    typer.echo(json.dumps(job, indent=2))
                return
            job = wait_with_progress(client, job["id"], quiet=False)
            output: dict[str, Any] = {"job": job}
            if job["status"] != "succeeded":
                say(f"job {job['status']}: {json.dumps(job.get('error'))}")
                if as_json:
                    typer.echo(json.dumps(output, indent=2))
                raise typer.Exit(1)
            result = client.result(job["id"])
            output["result"] = result
            for line in summary_lines(result):
                say(line)
            if out is not None and "model_sha256" not in result:
                say(f"no model was produced ({(result.get('decision') or {}).get('reason', 'nothing purified')}); "
                    f"{out} not written")
            elif out is not None:
                got, server = client.download_model(job["id"], out)
                expected = server or result.get("model_sha256")
                if expected and got != expected:
                    out.unlink(missing_ok=True)
                    raise ApiError(f"the downloaded model's sha256 {got} does not match {expected}")
                say(f"purified model saved to {out} (sha256 {got} verified)")
                output["purified_model"] = {"path": str(out), "sha256": got}
            if as_json:
                typer.echo(json.dumps(output, indent=2))
        except ApiError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        finally:
            client.close()
