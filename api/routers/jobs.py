"""``/v1/jobs``: create (idempotent), read, list, events, result, purified model, cancel."""

from __future__ import annotations

import base64
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic_core import to_json

from api.core.models import Job, JobStatus
from api.core.services import job_queries, lifecycle
from api.core.services.job_status import job_view
from api.core.services.jobs import JobRequest
from api.deps import CurrentOrg, QueueDep, SessionDep, StatusReaderDep, StoreDep
from api.schemas import (
    RESULT_EXAMPLE,
    JobCreate,
    JobEventPage,
    JobPage,
    JobRead,
    problem_responses,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retry-safe creation: the same key with the same body returns the same "
        "job (200, header Idempotent-Replayed: true); with a different body, 422.",
    ),
]


def _job_response(job: Job, *, status_code: int,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    body = JobRead.model_validate(job_view(job)).model_dump(mode="json")
    all_headers = {"Location": f"/v1/jobs/{job.id}", **(headers or {})}
    return JSONResponse(body, status_code=status_code, headers=all_headers)


@router.post(
    "",
    status_code=202,
    response_model=JobRead,
    summary="Submit a purification job",
    description="Validates that the artifacts belong to you, have the right kinds and roles "
    "and fit the model (image shape, label range), and that `params` are in range; then "
    "queues the job. Answers 202 with `Location: /v1/jobs/{id}`. A retry with the same "
    "`Idempotency-Key` and body answers 200 with the same job and `Idempotent-Replayed: true`.",
    responses={
        200: {"model": JobRead, "description": "Replay of an earlier request with the same "
              "Idempotency-Key (same job)"},
        **problem_responses(401, 404, 422),
    },
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    queue: QueueDep,
    org: CurrentOrg,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    request = JobRequest(**body.model_dump())
    job, created = lifecycle.create(
        session=session, queue=queue, org_id=org.id, request=request,
        idempotency_key=idempotency_key,
    )
    if created:
        return _job_response(job, status_code=202)
    return _job_response(job, status_code=200, headers={"Idempotent-Replayed": "true"})


@router.get(
    "",
    response_model=JobPage,
    summary="List your jobs, newest first",
    responses=problem_responses(401, 422),
)
def list_jobs(
    session: SessionDep,
    org: CurrentOrg,
    limit: Annotated[int, Query(ge=1, le=job_queries.MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(max_length=512, description="`next_cursor` of "
                                        "the previous page")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status")] = None,
) -> dict[str, Any]:
    page = job_queries.list_jobs(
        session=session, org_id=org.id, limit=limit, cursor=cursor,
        status=None if status is None else status.value,
    )
    return {"items": [job_view(job) for job in page.items], "next_cursor": page.next_cursor}


@router.get(
    "/{job_id}",
    response_model=JobRead,
    summary="A job's status, stage, progress, timings and summary metrics",
    responses=problem_responses(401, 404, 422),
)
async def get_job(job_id: uuid.UUID, reader: StatusReaderDep, org: CurrentOrg) -> Response:
    # Status polling is the hot path: one scoped primary-key SELECT (non-blocking on
    # PostgreSQL), and the document is serialised straight to JSON (no response-model
    # validation; ``response_model`` documents it, and a test checks the body against
    # ``JobRead``).
    view = await reader.view(org_id=org.id, job_id=job_id)
    return Response(to_json(view), media_type="application/json")


@router.get(
    "/{job_id}/events",
    response_model=JobEventPage,
    summary="A job's status transitions and progress ticks, oldest first",
    responses=problem_responses(401, 404, 422),
)
def list_events(
    job_id: uuid.UUID,
    session: SessionDep,
    org: CurrentOrg,
    after: Annotated[int, Query(ge=0, le=2**62, description="Only events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    events = job_queries.list_events(
        session=session, org_id=org.id, job_id=job_id, after=after, limit=limit
    )
    return {"items": events, "next_after": events[-1].id if events else after}


@router.get(
    "/{job_id}/result",
    summary="The Result document of a succeeded job",
    description="Metrics before/after each stage, DER, fidelity, timings, the NWC ranking "
    "of the top neurons and the parameters used (409 until the job has succeeded).",
    responses={
        200: {"description": "The Result document",
              "content": {"application/json": {"example": RESULT_EXAMPLE,
                                                "schema": {"type": "object"}}}},
        **problem_responses(401, 404, 409, 422),
    },
)
def get_result(job_id: uuid.UUID, session: SessionDep, org: CurrentOrg) -> JSONResponse:
    return JSONResponse(job_queries.result(session=session, org_id=org.id, job_id=job_id))


@router.get(
    "/{job_id}/model",
    summary="Download the purified model (safetensors)",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The purified model, streamed",
              "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                    "format": "binary"}}}},
        304: {"description": "If-None-Match matched the ETag"},
        **problem_responses(401, 404, 409, 422),
    },
)
def download_model(
    job_id: uuid.UUID,
    session: SessionDep,
    store: StoreDep,
    org: CurrentOrg,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=512)] = None,
) -> Response:
    artifact = job_queries.purified_model(session=session, org_id=org.id, job_id=job_id)
    etag = f'"{artifact.sha256}"'
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    headers = {
        "ETag": etag,
        "X-Content-SHA256": artifact.sha256,
        "Digest": f"sha-256={digest}",
        "Repr-Digest": f"sha-256=:{digest}:",
    }
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    filename = f"purified-{job_id}.safetensors"
    return StreamingResponse(
        store.iter_chunks(artifact.storage_key),
        media_type="application/octet-stream",
        headers={
            **headers,
            "Content-Length": str(artifact.size),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    summary="Cancel a job",
    description="Queued: cancelled at once. Running: `cancel_requested` becomes true and the "
    "worker stops at its next step. Already finished: 409.",
    responses=problem_responses(401, 404, 409, 422),
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, queue: QueueDep,
               org: CurrentOrg) -> dict[str, Any]:
    return job_view(lifecycle.cancel(session=session, queue=queue, org_id=org.id, job_id=job_id))


