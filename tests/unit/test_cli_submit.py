"""`cleanroom submit --task`: the job body it sends and what it prints, against a fake API client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

import cli.submit as submit_module
from cli.main import app

REPORT = {"verdict": "clean", "score": 0.12, "target": None, "signals": {}, "per_class": [], "thresholds": {},
          "timings_s": {"total": 1.0}}


class FakeClient:
    """Records the job bodies; every job succeeds at once with ``result``."""

    bodies: ClassVar[list[dict[str, Any]]] = []
    result_doc: ClassVar[dict[str, Any]] = {}

    def __init__(self, base_url: str, key: str) -> None:
        pass

    def upload_model(self, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
        return {"id": "mdl_1", "sha256": "0" * 64}

    def upload_dataset(self, path: Path, role: str) -> dict[str, Any]:
        return {"id": f"ds_{role}"}

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        self.bodies.append(body)
        return {"id": "job_1", "status": "queued"}

    def job(self, job_id: str) -> dict[str, Any]:
        return {"id": job_id, "status": "succeeded", "stage": None, "progress": None}

    def result(self, job_id: str) -> dict[str, Any]:
        return self.result_doc

    def close(self) -> None:
        pass


@pytest.fixture()
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setattr(submit_module, "Client", FakeClient)
    FakeClient.bodies = []
    paths = {name: tmp_path / name for name in ("model", "spec", "clean", "test")}
    for path in paths.values():
        path.write_text("{}")
    return paths


def _submit(files: dict[str, Path], *extra: str) -> Any:
    args = ["submit", "--key", "k", "--model", str(files["model"]), "--spec", str(files["spec"]),
            "--clean", str(files["clean"]), *extra]
    return CliRunner().invoke(app, args)


def test_the_task_is_sent_only_when_it_is_not_purify(files: dict[str, Path]) -> None:
    assert _submit(files).exit_code == 0
    assert _submit(files, "--task", "intake", "--test", str(files["test"])).exit_code == 0
    assert _submit(files, "--task", "screen", "--param", "margin_steps=40").exit_code == 0
    purify, intake, screen = FakeClient.bodies
    assert "task" not in purify and purify["defense"] == "tsbd"
    assert intake["task"] == "intake" and intake["test_dataset_id"] == "ds_test"
    assert screen == {"model_id": "mdl_1", "params": {"margin_steps": 40}, "task": "screen",
                      "clean_dataset_id": "ds_clean"}


def test_a_screening_refuses_inputs_it_does_not_take_and_unknown_tasks(files: dict[str, Path]) -> None:
    refused = _submit(files, "--task", "screen", "--test", str(files["test"]))
    assert refused.exit_code == 2 and "drop --test" in refused.output
    assert _submit(files, "--task", "audit").exit_code == 2
    assert FakeClient.bodies == []


def test_a_waited_screening_prints_its_verdict_and_an_intake_without_a_model_writes_no_file(
        files: dict[str, Path], tmp_path: Path) -> None:
    FakeClient.result_doc = REPORT
    shown = _submit(files, "--task", "screen", "--wait", "--json")
    assert shown.exit_code == 0 and "screening: clean (score 0.120, target -)" in shown.stderr
    assert json.loads(shown.stdout)["result"] == REPORT

    FakeClient.result_doc = {"task": "intake", "screening": REPORT,
                             "decision": {"purified": False, "reason": "verdict clean"}}
    out = tmp_path / "purified.safetensors"
    skipped = _submit(files, "--task", "intake", "--out", str(out))
    assert skipped.exit_code == 0 and "decision: not purified: verdict clean" in skipped.output
    assert "no model was produced" in skipped.output and not out.exists()
