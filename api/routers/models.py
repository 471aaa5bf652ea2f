"""``/v1/models``: upload a model (streamed, validated against its spec) and read it back."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.core.models import ArtifactKind
from api.core.services import artifacts as artifact_service
from api.core.services import job_queries
from api.deps import CurrentOrg, MetricsDep, SessionDep, SettingsDep, StoreDep
from api.schemas import ArtifactRead, ModelPage, Verdict, problem_responses
from api.uploads import receive_upload

router = APIRouter(prefix="/v1/models", tags=["models"])

MODEL_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "spec"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "safetensors or a weights-only torch state dict with a "
                            "registry architecture; for a custom architecture a torch.export archive "
                            "(.pt2, spec.arch = \"torch_export\") or, deprecated, a TorchScript "
                            "archive (spec.arch = \"torchscript\")",
                        },
                        "spec": {
                            "type": "string",
                            "description": "The model spec as a JSON string",
                            "example": '{"arch": "preact_resnet18", "num_classes": 10, '
                            '"in_channels": 1, "input_size": [28, 28], '
                            '"mean": [0.1307], "std": [0.3081]}',
                        },
                    },
                },
                "encoding": {"file": {"contentType": "application/octet-stream"}},
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ArtifactRead,
    summary="Upload a model",
    description="Streams the file to the server (size-bounded, sha256 computed on the way), "
    "checks it against the declared architecture without unpickling anything, then stores "
    "it. The check loads the model and runs it on zeros and on a random batch in a contained "
    "child process (no credentials, scratch-only filesystem, memory and time bounds); archives "
    "that carry code are first checked against an operator allowlist (422 forbidden-operator "
    "naming the operator). A rejected upload leaves nothing behind.",
    openapi_extra=MODEL_UPLOAD_BODY,
    responses=problem_responses(400, 401, 413, 415, 422),
)
async def upload_model(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    org: CurrentOrg,
    metrics: MetricsDep,
) -> dict[str, Any]:
    async with receive_upload(
        request,
        max_file_bytes=settings.max_model_bytes,
        staging_dir=settings.data_dir / "uploads",
        text_fields=frozenset({"spec"}),
        required_fields=("spec",),
        on_bytes=metrics.upload_bytes.labels("model").inc,
    ) as upload:
        spec = artifact_service.parse_model_spec(upload.fields.get("spec"))
        artifact = await run_in_threadpool(
            lambda: artifact_service.create_model(
                session=session, store=store, org_id=org.id, staged=upload.file, spec=spec,
                settings=settings,
            )
        )
    return artifact_service.public_view(artifact)


@router.get(
    "",
    response_model=ModelPage,
    summary="List your models, newest first, optionally by their latest screening's verdict",
    responses=problem_responses(401, 422),
)
def list_models(
    session: SessionDep,
    org: CurrentOrg,
    limit: Annotated[int, Query(ge=1, le=job_queries.MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(max_length=512, description="`next_cursor` of "
                                        "the previous page")] = None,
    verdict: Annotated[Verdict | None, Query(description="Only models whose latest screening "
                                             "gave this verdict")] = None,
) -> dict[str, Any]:
    page = job_queries.list_models(session=session, org_id=org.id, limit=limit, cursor=cursor,
                                   verdict=verdict)
    return {"items": [artifact_service.public_view(model) for model in page.items],
            "next_cursor": page.next_cursor}


@router.get(
    "/{model_id}",
    response_model=ArtifactRead,
    summary="A model's metadata and its latest screening",
    responses=problem_responses(401, 404, 422),
)
def get_model(model_id: uuid.UUID, session: SessionDep, org: CurrentOrg) -> dict[str, Any]:
    artifact = artifact_service.get(
        session=session, org_id=org.id, artifact_id=model_id,
        kinds=(ArtifactKind.MODEL.value, ArtifactKind.PURIFIED_MODEL.value), what="model",
    )
    return artifact_service.public_view(artifact)



