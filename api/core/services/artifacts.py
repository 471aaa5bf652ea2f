"""Artifacts: turn a staged upload into a validated, stored, recorded model or dataset.

The HTTP layer streams the request body to a local temporary file (computing
size and sha256 on the way, bounded by the configured maximum); this service
then

1. validates it with the engine (``inspect_model_file`` / ``inspect_dataset_file``:
   format sniffed, no arbitrary unpickling, safetensors keys and shapes checked
   against the declared architecture, NPZ without pickle, archive bounds),
2. copies it to the artifact store in chunks,
3. records the row and commits.

A rejected file never reaches the store, and any failure after step 2 deletes
the stored object again, so a failed upload leaves nothing behind.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from api.core import repositories as repo
from api.core.errors import DomainError, NotFound, OutOfResources, ServiceUnavailable
from api.core.models import Artifact, ArtifactKind, DatasetRole, Organization
from api.core.services import RejectedInput, from_input_error
from api.core.settings import Settings
from api.core.store import ArtifactStore, artifact_key
from defense_core.errors import InputError
from defense_core.spec import CODE_ARCHS, ModelSpec

if TYPE_CHECKING:
    from defense_core.data import DatasetInfo

log = logging.getLogger(__name__)

MAX_SPEC_CHARS = 16_384
MAX_FILENAME_CHARS = 255
_EXTENSIONS = {
    "safetensors": ".safetensors",
    "state_dict": ".pt",
    "torchscript": ".pt",
    "torch_export": ".pt2",
    "npz": ".npz",
    "zip": ".zip",
    "tar.gz": ".tar.gz",
    "tar": ".tar",
}


@dataclass(frozen=True)
class StagedFile:
    """An uploaded file on local disk, with what was measured while it was streamed."""

    path: Path
    size: int
    sha256: str
    filename: str


def parse_model_spec(raw: str | None) -> ModelSpec:
    """The ``spec`` form field (a JSON string) as a :class:`ModelSpec`, or a 422."""
    if raw is None or not raw.strip():
        raise RejectedInput("the form field 'spec' (the model spec as JSON) is required",
                            slug="invalid-spec")
    if len(raw) > MAX_SPEC_CHARS:
        raise RejectedInput(f"spec is longer than {MAX_SPEC_CHARS} characters", slug="invalid-spec")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RejectedInput(f"spec is not valid JSON: {exc.msg} at position {exc.pos}",
                            slug="invalid-spec") from None
    except RecursionError:
        raise RejectedInput("spec nests too deeply", slug="invalid-spec") from None
    try:
        spec = ModelSpec.from_dict(data)
    except InputError as exc:
        raise RejectedInput(str(exc), slug="invalid-spec") from None
    if not spec.carries_code:  # torch_export / torchscript files hold their own architecture
        from defense_core.registry import available_models

        known = available_models()
        if spec.arch not in known:
            raise RejectedInput(
                f"unknown architecture {spec.arch!r}; known: {', '.join(known)}, "
                "or torch_export (a torch.export.save archive) / torchscript (deprecated) "
                "for a custom architecture",
                slug="unknown-architecture",
            )
    return spec


def parse_role(raw: str | None) -> DatasetRole:
    roles = [role.value for role in DatasetRole]
    if raw is None or raw not in roles:
        raise RejectedInput(f"the form field 'role' must be one of {roles}, got {raw!r}",
                            slug="invalid-role")
    return DatasetRole(raw)


def clean_filename(name: str | None, *, default: str) -> str:
    """A display name without directories or control characters (never used as a path)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable() and ch not in '"')
    return base[:MAX_FILENAME_CHARS] or default


def create_model(
    *,
    session: Session,
    store: ArtifactStore,
    org_id: uuid.UUID,
    staged: StagedFile,
    spec: ModelSpec,
    settings: Settings,
) -> Artifact:
    """Validate ``staged`` against ``spec`` in a contained child, store it and record a ``model``."""
    check_code_allowed(session=session, org_id=org_id, spec=spec, settings=settings)
    validation = inspect_model_contained(staged.path, spec, settings=settings)
    return _store_and_record(
        session=session,
        store=store,
        org_id=org_id,
        staged=staged,
        kind=ArtifactKind.MODEL,
        role=None,
        file_format=str(validation.get("format", "unknown")),
        meta={"spec": spec.to_dict(), "validation": validation},
    )


def check_code_allowed(*, session: Session, org_id: uuid.UUID, spec: ModelSpec, settings: Settings) -> None:
    """422 ``code-models-refused`` when the service or the organization refuses code-carrying models."""
    if spec.arch not in CODE_ARCHS:  # formats that carry their own code
        return
    if not settings.allow_code_models:
        raise RejectedInput(f"this service does not accept models that carry code (spec.arch {spec.arch!r}); "
                            "upload safetensors or a state dict with a registry architecture",
                            slug="code-models-refused")
    org = session.get(Organization, org_id)  # read now, not from the key cache: a change applies at once
    if org is not None and not org.allow_code_models:
        raise RejectedInput(f"your organization does not accept models that carry code (spec.arch {spec.arch!r}); "
                            "upload safetensors or a state dict with a registry architecture",
                            slug="code-models-refused")


def inspect_model_contained(path: Path, spec: ModelSpec, *, settings: Settings) -> dict[str, Any]:
    """The engine's ``inspect_model_file``, run where the model's code cannot reach the API.

    Loading a model may run code it carries (TorchScript ``__setstate__``) and
    the check runs its forward pass, so it happens in a contained child (no
    credentials, scratch-only filesystem, memory and time bounds, killed when
    over them), never in this process. The staged file is hard-linked into the
    child's scratch directory (copied when the link cannot be made).
    """
    from defense_core.sandbox import ChildFailed, Limits, ResourceLimitError, run_contained, shared_pool

    scratch = settings.scratch_path / f"upload-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True, mode=0o700)
    try:
        try:
            os.link(path, scratch / "model.bin")
        except OSError:
            shutil.copyfile(path, scratch / "model.bin")
        size = path.stat().st_size
        limits = Limits(
            wall_seconds=settings.model_validation_timeout_s,
            memory_bytes=settings.model_validation_memory_bytes + 4 * size,
            file_bytes=64 << 20,
            threads=1,
        )
        args = {"model": "model.bin", "spec": spec.to_dict(), "max_bytes": settings.max_model_bytes}
        try:
            outcome = run_contained("inspect_model", args, scratch=scratch, limits=limits,
                                    pool=shared_pool(spares=settings.sandbox_spares, threads=1))
        except ResourceLimitError as exc:
            raise RejectedInput(f"model: {exc}", slug="resource-limit") from None
        except InputError as exc:
            extra = {"operator": exc.operator} if getattr(exc, "operator", None) else None
            error = from_input_error(exc, where="model")
            if extra and isinstance(error, RejectedInput):
                error.extra.update(extra)
            raise error from None
        except ChildFailed as exc:
            log.warning("model validation child failed: %s", exc)
            raise RejectedInput("model: the model crashed the validator; it cannot be used",
                                slug="model-crashed") from None
        except OSError as exc:  # no process could be started (EAGAIN, ENOMEM): the host's trouble
            log.error("could not start a model validation child: %s", exc)
            raise ServiceUnavailable("the service cannot validate models right now; try again later",
                                     extra={"retry_after_s": 30}) from None
        return outcome.result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def create_dataset(
    *,
    session: Session,
    store: ArtifactStore,
    org_id: uuid.UUID,
    staged: StagedFile,
    role: DatasetRole,
) -> Artifact:
    """Validate ``staged`` as a dataset of ``role``, store it and record a ``dataset`` artifact."""
    info = inspect_dataset(staged.path, role=role)
    validation = info.to_dict()
    return _store_and_record(
        session=session,
        store=store,
        org_id=org_id,
        staged=staged,
        kind=ArtifactKind.DATASET,
        role=role,
        file_format=str(validation.get("format", "unknown")),
        meta={"validation": validation},
    )


def inspect_dataset(path: Path, *, role: DatasetRole) -> DatasetInfo:
    """The engine's ``inspect_dataset_file`` (in this process, within its ``ArchiveLimits``).

    Bad input is a 4xx with the engine's code. Running short of memory or file
    handles while reading is the server's trouble: a retryable 503
    (:class:`OutOfResources`), whatever the file. The domain error is raised
    outside the ``except`` blocks so it carries no ``__context__``: the failed
    read's frames, and the buffers they held, go as soon as the error is handled.
    """
    from defense_core.data import inspect_dataset_file, is_resource_error

    error: DomainError
    try:
        return inspect_dataset_file(path, role=role.value)
    except InputError as exc:
        error = from_input_error(exc, where="dataset")
    except Exception as exc:
        if not is_resource_error(exc):
            raise
        error = _out_of_resources(exc, what="the dataset")
    if isinstance(error, OutOfResources):
        gc.collect()  # reference cycles from the failed read would otherwise hold memory until a full collection
    raise error


def _out_of_resources(exc: BaseException, *, what: str) -> OutOfResources:
    handles = isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)
    short_of = "file handles" if handles else "memory"
    log.warning("ran short of %s while reading %s (%s: %s)", short_of, what, type(exc).__name__, exc)
    return OutOfResources(
        f"the server ran short of {short_of} while reading {what}; nothing is wrong with "
        "the upload, try again later",
        extra={"short_of": short_of.replace(" ", "-")},
    )


def _store_and_record(
    *,
    session: Session,
    store: ArtifactStore,
    org_id: uuid.UUID,
    staged: StagedFile,
    kind: ArtifactKind,
    role: DatasetRole | None,
    file_format: str,
    meta: dict[str, Any],
) -> Artifact:
    artifact_id = uuid.uuid4()
    extension = _EXTENSIONS.get(file_format, "")
    key = artifact_key(org_id=org_id, artifact_id=artifact_id, suffix=extension)
    stored = store.put_file(key, staged.path)
    try:
        if stored.sha256 != staged.sha256 or stored.size != staged.size:
            raise RuntimeError(
                f"store wrote {stored.size} bytes sha256 {stored.sha256}, "
                f"expected {staged.size} bytes sha256 {staged.sha256}"
            )
        artifact = repo.create_artifact(
            session=session,
            artifact_id=artifact_id,
            org_id=org_id,
            kind=kind.value,
            role=None if role is None else role.value,
            format=file_format,
            filename=clean_filename(staged.filename, default=f"{artifact_id}{extension}"),
            size=staged.size,
            sha256=staged.sha256,
            storage_key=key,
            meta=meta,
        )
        session.commit()
    except BaseException:
        session.rollback()
        _delete_quietly(store, key)
        raise
    log.info("stored %s %s (%d bytes) for org %s", kind.value, artifact_id, staged.size, org_id)
    return artifact


def _delete_quietly(store: ArtifactStore, key: str) -> None:
    try:
        store.delete(key)
    except Exception:  # the original error matters more; this one is logged
        log.exception("could not delete %s after a failed upload", key)


def get(
    *,
    session: Session,
    org_id: uuid.UUID,
    artifact_id: uuid.UUID,
    kinds: tuple[str, ...] | None = None,
    what: str = "artifact",
) -> Artifact:
    """The caller's artifact, or 404 (also for another organization's artifact)."""
    artifact = repo.get_artifact(session=session, org_id=org_id, artifact_id=artifact_id)
    if artifact is None or (kinds is not None and artifact.kind not in kinds):
        raise NotFound(f"{what} {artifact_id} not found")
    return artifact


def public_view(artifact: Artifact) -> dict[str, Any]:
    """The artifact as the API shows it (``ArtifactRead``)."""
    meta = artifact.meta or {}
    return {
        "id": artifact.id,
        "kind": artifact.kind,
        "role": artifact.role,
        "format": artifact.format,
        "filename": artifact.filename,
        "size": artifact.size,
        "sha256": artifact.sha256,
        "created_at": artifact.created_at,
        "validation": meta.get("validation", {}),
        "spec": meta.get("spec"),
        "dataset": meta.get("validation") if artifact.kind == ArtifactKind.DATASET else None,
        "screening": None if artifact.screening_verdict is None else {
            "verdict": artifact.screening_verdict,
            "score": artifact.screening_score,
            "target": artifact.screening_target,
            "job_id": artifact.screening_job_id,
            "screened_at": artifact.screened_at,
        },
    }
