"""What a client may ask for: the job request (``POST /v1/jobs``) and its validation
against the caller's artifacts and the engine's parameter checks.

The transitions (creating the job among them) are in :mod:`api.core.services.lifecycle`,
the reads in :mod:`api.core.services.job_queries`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from api.core.models import Artifact, ArtifactKind, DatasetRole
from api.core.services import RejectedInput, from_input_error
from api.core.services import artifacts as artifact_service
from defense_core.errors import InputError

DEFAULT_TASK = "purify"


@dataclass(frozen=True)
class JobRequest:
    """What a client asks for (the body of ``POST /v1/jobs``)."""

    model_id: uuid.UUID
    clean_dataset_id: uuid.UUID
    test_dataset_id: uuid.UUID | None = None
    poisoned_dataset_id: uuid.UUID | None = None
    trigger: dict[str, Any] | None = None
    defense: str = "tsbd"
    params: dict[str, Any] = field(default_factory=dict)
    task: str = DEFAULT_TASK

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the request (defaults included; ``task`` only
        when it is not the default, so purification jobs keep their fingerprints)."""
        document: dict[str, Any] = {
            "model_id": str(self.model_id),
            "clean_dataset_id": str(self.clean_dataset_id),
            "test_dataset_id": _str_or_none(self.test_dataset_id),
            "poisoned_dataset_id": _str_or_none(self.poisoned_dataset_id),
            "trigger": self.trigger,
            "defense": self.defense,
            "params": self.params,
        }
        if self.task != DEFAULT_TASK:
            document["task"] = self.task
        canonical = json.dumps(
            document,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _str_or_none(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def engine_request_fields(request: JobRequest) -> dict[str, Any]:
    """The fields every job kind's request type is built from (``from_dict``)."""
    return {"model": request.model_id, "clean": request.clean_dataset_id,
            "test": request.test_dataset_id, "poisoned": request.poisoned_dataset_id,
            "trigger": request.trigger, "defense": request.defense, "params": request.params,
            "spec": None}


def _engine_request(request: JobRequest) -> Any:
    """The engine's request for this job: its kind's request type (the kinds and their
    rules: :mod:`defense_core.jobs`)."""
    from defense_core.errors import InputError
    from defense_core.jobs import available_job_kinds, get_job_kind

    try:
        kind = get_job_kind(request.task)
    except (InputError, KeyError, ValueError):
        raise RejectedInput(f"task must be one of {available_job_kinds()}, got {request.task!r}",
                            slug="invalid-task") from None
    return kind.request.from_dict(engine_request_fields(request))


def _field_names() -> Any:
    """How the engine's messages name the inputs: the fields of the request body."""
    from defense_core.jobs.request import InputNames

    return InputNames(test="test_dataset_id", poisoned="poisoned_dataset_id", trigger="trigger",
                      poisoned_data="poisoned_dataset_id or trigger")


def _validate(*, session: Session, org_id: uuid.UUID, request: JobRequest) -> None:
    """The engine's rules (:meth:`PurifyRequest.validate`) and the checks that need the
    database: the artifacts exist, belong to the organization and fit the model."""
    import dataclasses

    names = _field_names()
    engine_request = _engine_request(request)
    try:  # what needs no model spec first: a malformed request reads nothing
        engine_request.check_inputs(names=names)
    except InputError as exc:
        raise from_input_error(exc) from None

    model = artifact_service.get(
        session=session, org_id=org_id, artifact_id=request.model_id, what="model",
    )
    if model.kind not in (ArtifactKind.MODEL, ArtifactKind.PURIFIED_MODEL):
        raise RejectedInput(f"model_id {model.id} is a {model.kind}, not a model",
                            slug="wrong-artifact-kind")
    spec = (model.meta or {}).get("spec")
    if not isinstance(spec, dict):
        raise RejectedInput(f"model {model.id} has no model spec", slug="wrong-artifact-kind")

    for field_name, role in (
        ("clean_dataset_id", DatasetRole.CLEAN),
        ("test_dataset_id", DatasetRole.TEST),
        ("poisoned_dataset_id", DatasetRole.POISONED),
    ):
        dataset_id = getattr(request, field_name)
        if dataset_id is None:
            continue
        dataset = artifact_service.get(
            session=session, org_id=org_id, artifact_id=dataset_id, what="dataset",
        )
        _check_dataset(dataset, field_name=field_name, role=role, spec=spec)

    try:
        dataclasses.replace(engine_request, spec=spec).validate(names=names)
    except InputError as exc:
        raise from_input_error(exc) from None


def _check_dataset(dataset: Artifact, *, field_name: str, role: DatasetRole,
                   spec: dict[str, Any]) -> None:
    if dataset.kind != ArtifactKind.DATASET:
        raise RejectedInput(f"{field_name} {dataset.id} is a {dataset.kind}, not a dataset",
                            slug="wrong-artifact-kind")
    if dataset.role != role.value:
        raise RejectedInput(
            f"{field_name} {dataset.id} was uploaded with role {dataset.role!r}; "
            f"expected {role.value!r}",
            slug="wrong-dataset-role",
        )
    info = (dataset.meta or {}).get("validation") or {}
    expected_shape = [spec["in_channels"], *spec["input_size"]]
    shape = info.get("image_shape")
    if shape is not None and list(shape) != expected_shape:
        raise RejectedInput(
            f"{field_name}: images are {'x'.join(map(str, shape))} but the model expects "
            f"{'x'.join(map(str, expected_shape))}",
            slug="shape-mismatch",
        )
    num_classes = int(spec["num_classes"])
    label_min, label_max = info.get("label_min"), info.get("label_max")
    if (label_min is not None and label_min < 0) or (
        label_max is not None and label_max >= num_classes
    ):
        raise RejectedInput(
            f"{field_name}: labels span [{label_min}, {label_max}] but the model has "
            f"{num_classes} classes",
            slug="label-out-of-range",
        )
    targets = info.get("target_labels") or []
    bad_targets = [t for t in targets if not 0 <= int(t) < num_classes]
    if bad_targets:
        raise RejectedInput(
            f"{field_name}: target labels {bad_targets} are outside [0, {num_classes - 1}]",
            slug="label-out-of-range",
        )


def _check_trigger(trigger: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """The engine's trigger rules against the model spec, as a problem."""
    from defense_core.jobs.request import check_trigger

    try:
        check_trigger(trigger, spec=spec)
    except InputError as exc:
        raise from_input_error(exc) from None
