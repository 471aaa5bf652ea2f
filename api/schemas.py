"""Request and response bodies of the v1 API (with the examples shown at /docs)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Defense = Literal["tsbd", "ft"]
# The job kinds of defense_core.jobs (a unit test keeps the two lists equal).
JobTask = Literal["purify", "screen", "intake"]
Verdict = Literal["clean", "suspicious", "backdoored"]
DatasetRole = Literal["clean", "test", "poisoned"]

EXAMPLE_MODEL_ID = "6f1c2a4e-3b7d-4c1e-9a51-0d6e1f2a3b4c"
EXAMPLE_CLEAN_ID = "0b8e5c7d-1a2f-4e3d-8c9b-7a6f5e4d3c2b"
EXAMPLE_TEST_ID = "9d4e3f2a-6b5c-4d7e-8f9a-0b1c2d3e4f5a"
EXAMPLE_JOB_ID = "3c2b1a0f-9e8d-4c7b-a6f5-e4d3c2b1a098"
EXAMPLE_SPEC: dict[str, Any] = {
    "arch": "preact_resnet18",
    "num_classes": 10,
    "in_channels": 1,
    "input_size": [28, 28],
    "mean": [0.1307],
    "std": [0.3081],
}
EXAMPLE_TIME = "2025-01-01T12:00:00Z"


# -- problems -------------------------------------------------------------------------


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": PROBLEM_BASE + "not-found",
                    "title": "Not found",
                    "status": 404,
                    "detail": f"job {EXAMPLE_JOB_ID} not found",
                    "instance": f"/v1/jobs/{EXAMPLE_JOB_ID}",
                }
            ]
        },
    )

    type: str = Field(description="Stable URI of the kind of problem")
    title: str
    status: int
    detail: str
    instance: str = Field(description="Path of the request that failed")


class ValidationErrorItem(BaseModel):
    loc: list[str]
    msg: str
    type: str


class ValidationProblem(Problem):
    errors: list[ValidationErrorItem]


def _problem_example(status: int, slug: str, title: str, detail: str) -> dict[str, Any]:
    return {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "/v1/...",
    }


_PROBLEM_EXAMPLES: dict[int, tuple[str, str, str]] = {
    400: ("bad-request", "Bad request", "the request is malformed"),
    401: ("unauthorized", "Missing or invalid API key", "send Authorization: Bearer <key>"),
    403: ("metrics-forbidden", "Metrics not available to this client",
          "GET /metrics needs 'Authorization: Bearer <METRICS_TOKEN>'"),
    404: ("not-found", "Not found", f"job {EXAMPLE_JOB_ID} not found"),
    409: ("job-not-succeeded", "Job has not succeeded", "job is running; no result yet"),
    413: ("payload-too-large", "Payload too large", "the file exceeds 2147483648 bytes"),
    415: ("unsupported-media-type", "Unsupported media type", "expected multipart/form-data"),
    422: ("invalid-input", "Invalid input", "params.unlearn_epochs: must be in [1, 100]"),
    503: ("not-ready", "Service not ready", "database: connection refused"),
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries (schema + example) for the given problem statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        slug, title, detail = _PROBLEM_EXAMPLES[status]
        example = _problem_example(status, slug, title, detail)
        model: type[Problem] = Problem
        if status == 422:
            model = ValidationProblem
            example = {**example, "errors": []}
        out[status] = {
            "model": model,
            "description": title,
            "content": {PROBLEM_MEDIA_TYPE: {"example": example}},
        }
    return out


# -- artifacts --------------------------------------------------------------------------


class ModelScreening(BaseModel):
    """A model's latest screening: the verdict of the last succeeded job that screened it."""

    verdict: Verdict
    score: float | None = Field(default=None, description="Calibrated probability that the model is backdoored")
    target: int | None = Field(default=None, description="Suspected target label (null for a clean verdict)")
    job_id: uuid.UUID = Field(description="The job whose Result holds the full ScreeningReport")
    screened_at: datetime


class ArtifactRead(BaseModel):
    """An uploaded (or produced) model or dataset."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": EXAMPLE_MODEL_ID,
                    "kind": "model",
                    "role": None,
                    "format": "safetensors",
                    "filename": "model.safetensors",
                    "size": 44812345,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "created_at": EXAMPLE_TIME,
                    "validation": {"format": "safetensors", "num_tensors": 62,
                                   "num_parameters": 11171146},
                    "spec": EXAMPLE_SPEC,
                    "dataset": None,
                }
            ]
        }
    )

    id: uuid.UUID
    kind: Literal["model", "dataset", "purified_model"]
    role: DatasetRole | None = None
    format: str
    filename: str | None = None
    size: int
    sha256: str
    created_at: datetime
    validation: dict[str, Any] = Field(description="What the engine's inspection found")
    spec: dict[str, Any] | None = Field(default=None, description="Model spec (models only)")
    dataset: dict[str, Any] | None = Field(
        default=None, description="Dataset summary (datasets only): samples, shape, labels"
    )
    screening: ModelScreening | None = Field(
        default=None, description="The model's latest screening (uploaded models that a succeeded "
        "job screened; null otherwise)"
    )


class ModelPage(BaseModel):
    """One page of ``GET /v1/models`` (newest first)."""

    items: list[ArtifactRead]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page")


# -- jobs --------------------------------------------------------------------------------


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": EXAMPLE_MODEL_ID,
                    "clean_dataset_id": EXAMPLE_CLEAN_ID,
                    "test_dataset_id": EXAMPLE_TEST_ID,
                    "trigger": {"type": "badnets", "target": 0},
                    "defense": "tsbd",
                    "params": {"seed": 0},
                }
            ]
        },
    )

    model_id: uuid.UUID
    clean_dataset_id: uuid.UUID
    test_dataset_id: uuid.UUID | None = None
    poisoned_dataset_id: uuid.UUID | None = Field(
        default=None, description="A poisoned test set (role poisoned); excludes `trigger`"
    )
    trigger: dict[str, Any] | None = Field(
        default=None,
        description="Trigger spec applied to the test set; excludes `poisoned_dataset_id`",
    )
    task: JobTask = Field(
        default="purify",
        description="What the job does: `purify` (screen, purify, evaluate), `screen` (the verdict only: "
        "model and clean set, no test or poisoned data), `intake` (screen, then purify only a model "
        "flagged suspicious or backdoored; the Result's `decision` says which and why)",
    )
    defense: Defense = "tsbd"
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Defense parameters, all optional: seed, batch_size, unlearn_lr, unlearn_max_epochs, "
        "unlearn_max_steps, stop_acc, neuron_ratio (a number in (0, 1], \"auto\", or a sweep: \"sweep\" or a "
        "list of n, which needs test and poisoned data and keeps the n with the best DER), weight_ratio, alpha, "
        "rho, perturb_norm, ft_epochs, ft_min_steps, ft_lr, ft_noise_blend, augment. Unknown names are refused.",
    )


class JobProgress(BaseModel):
    step: int | None = None
    total: int | None = None
    metrics: dict[str, Any] | None = None


class JobRead(BaseModel):
    """A purification job (``GET /v1/jobs/{id}``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": EXAMPLE_JOB_ID,
                    "task": "purify",
                    "status": "running",
                    "stage": "unlearning",
                    "progress": {"step": 120, "total": 400, "metrics": {"loss": 0.41}},
                    "defense": "tsbd",
                    "params": {"seed": 0},
                    "model_id": EXAMPLE_MODEL_ID,
                    "clean_dataset_id": EXAMPLE_CLEAN_ID,
                    "test_dataset_id": EXAMPLE_TEST_ID,
                    "poisoned_dataset_id": None,
                    "trigger": {"type": "badnets", "target": 0},
                    "created_at": EXAMPLE_TIME,
                    "started_at": EXAMPLE_TIME,
                    "finished_at": None,
                    "cancel_requested": False,
                    "attempts": 1,
                    "summary": None,
                    "error": None,
                    "purified_model_id": None,
                }
            ]
        }
    )

    id: uuid.UUID
    task: JobTask = "purify"
    status: JobStatus
    stage: str | None = None
    progress: JobProgress
    defense: str
    params: dict[str, Any]
    model_id: uuid.UUID
    clean_dataset_id: uuid.UUID
    test_dataset_id: uuid.UUID | None = None
    poisoned_dataset_id: uuid.UUID | None = None
    trigger: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool
    attempts: int
    summary: dict[str, Any] | None = Field(
        default=None,
        description="Headline figures of a succeeded job: ca/asr/ra before and after, der, fidelity, "
        "`screening` (verdict, score, target) and `purified` (whether it produced a purified model)",
    )
    error: dict[str, Any] | None = Field(default=None, description="Problem document of a failed job")
    purified_model_id: uuid.UUID | None = None


class JobPage(BaseModel):
    """One page of ``GET /v1/jobs`` (newest first)."""

    items: list[JobRead]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end")


class JobEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    kind: Literal["status", "progress"]
    status: str | None = None
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    metrics: dict[str, Any] | None = None
    message: str | None = None


class JobEventPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"id": 1, "created_at": EXAMPLE_TIME, "kind": "status",
                         "status": "queued", "stage": None, "step": None, "total": None,
                         "metrics": None, "message": "job created"},
                        {"id": 2, "created_at": EXAMPLE_TIME, "kind": "progress",
                         "status": None, "stage": "unlearning", "step": 10, "total": 400,
                         "metrics": {"loss": 0.52}, "message": None},
                    ],
                    "next_after": 2,
                }
            ]
        }
    )

    items: list[JobEventRead]
    next_after: int | None = Field(
        description="Pass as `after` to get newer events (the last id returned, or the `after` given)"
    )


RESULT_EXAMPLE: dict[str, Any] = {
    "metrics": {
        "before": {"ca": 0.93, "asr": 0.99, "ra": 0.01},
        "after_stage1": {"ca": 0.71, "asr": 0.98, "ra": 0.02},
        "after": {"ca": 0.91, "asr": 0.02, "ra": 0.88},
    },
    "der": 0.97,
    "fidelity": 0.96,
    "timings_s": {"unlearning": 12.1, "ranking": 0.4, "reinitializing": 0.1,
                  "finetuning": 40.2, "evaluating": 3.3, "total": 56.1},
    "unlearning": {"epochs": 5, "steps": 400, "final_clean_acc": 0.1},
    "reinit": {"neuron_ratio": 0.05, "weight_ratio": 0.7, "neurons_zeroed": 96,
               "weights_zeroed": 80640},
    "top_neurons": [{"layer": "layer4.1.conv2", "channel": 17, "nwc": 0.83}],
    "params": {"seed": 0},
    "model_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
}


# -- ops ---------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "ok", "checks": {"database": "ok", "broker": "ok", "store": "ok"}}]
        }
    )

    status: Literal["ok"] = "ok"
    checks: dict[str, str]
