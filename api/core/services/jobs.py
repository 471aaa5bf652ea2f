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

DEFENSES = ("tsbd", "ft")


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

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the request (defaults included)."""
        canonical = json.dumps(
            {
                "model_id": str(self.model_id),
                "clean_dataset_id": str(self.clean_dataset_id),
                "test_dataset_id": _str_or_none(self.test_dataset_id),
                "poisoned_dataset_id": _str_or_none(self.poisoned_dataset_id),
                "trigger": self.trigger,
                "defense": self.defense,
                "params": self.params,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _str_or_none(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _validate(*, session: Session, org_id: uuid.UUID, request: JobRequest) -> None:
    if request.defense not in DEFENSES:
        raise RejectedInput(f"defense must be one of {list(DEFENSES)}, got {request.defense!r}",
                            slug="invalid-defense")
    if request.poisoned_dataset_id is not None and request.trigger is not None:
        raise RejectedInput(
            "give either poisoned_dataset_id or trigger, not both", slug="conflicting-inputs"
        )
    if request.trigger is not None and request.test_dataset_id is None:
        raise RejectedInput(
            "a trigger is applied to the test set: test_dataset_id is required with trigger",
            slug="missing-test-dataset",
        )

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

    if request.trigger is not None:
        _check_trigger(request.trigger, spec=spec)
    config = _check_params(request.defense, request.params)
    if config.sweep and (request.test_dataset_id is None
                         or (request.poisoned_dataset_id is None and request.trigger is None)):
        raise RejectedInput(
            "params.neuron_ratio: a sweep chooses n by DER, so it needs test_dataset_id and "
            "poisoned_dataset_id or trigger",
            slug="sweep-needs-poisoned-data",
        )


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
    from defense_core.attacks import TriggerSpec

    try:
        parsed = TriggerSpec.from_dict(trigger)
    except InputError as exc:
        raise from_input_error(exc, where="trigger") from None
    target = getattr(parsed, "target", trigger.get("target"))
    if isinstance(target, int) and not 0 <= target < int(spec["num_classes"]):
        raise RejectedInput(
            f"trigger.target {target} is outside [0, {int(spec['num_classes']) - 1}]",
            slug="label-out-of-range",
        )
    _check_trigger_fits(parsed, spec)


def _check_trigger_fits(parsed: Any, spec: dict[str, Any]) -> None:
    """Apply the trigger to one blank image of the model's input shape (a pattern of the wrong depth fails here)."""
    import torch

    from defense_core.attacks import apply_trigger

    try:
        height, width = (int(v) for v in spec["input_size"])
        blank = torch.zeros(1, int(spec["in_channels"]), height, width, dtype=torch.uint8)
    except (KeyError, TypeError, ValueError):
        return  # a spec without a usable input shape: the worker checks against the test images
    try:
        apply_trigger(blank, parsed)
    except InputError as exc:
        raise from_input_error(exc, where="trigger") from None


def _check_params(defense: str, params: dict[str, Any]) -> Any:
    from defense_core.pipeline import PurifyConfig

    try:
        return PurifyConfig.from_params(params, defense=defense)
    except InputError as exc:
        raise from_input_error(exc, where="params") from None
    except (TypeError, ValueError) as exc:  # a value of an unexpected JSON type
        raise RejectedInput(f"params: {exc}", slug="invalid-input") from None
