"""The ``purify`` job kind: a :class:`~defense_core.jobs.request.PurifyRequest`, run by
:func:`run_purify` (screen, purify, write the purified model, return the Result document)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from defense_core.jobs import register_job_kind
from defense_core.jobs.request import LoadedPurify, PurifyRequest
from defense_core.loading import save_safetensors
from defense_core.pipeline import purify
from defense_core.progress import CancelHook, Reporter


@register_job_kind("purify", request=PurifyRequest)
def run_purify(loaded: LoadedPurify, *, out: Path, metadata: Mapping[str, Any] | None = None,
               reporter: Reporter | None = None,
               cancel: CancelHook | None = None) -> dict[str, Any]:
    """Purify the loaded inputs, write the purified model to ``out`` (safetensors, with
    ``metadata`` and the defense's name) and return the Result document (its
    ``screening`` the report on the model as given)."""
    result = purify(loaded.model, loaded.spec, loaded.clean, test=loaded.test,
                    poisoned=loaded.poisoned, config=loaded.config, reporter=reporter,
                    cancel=cancel)
    file_metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    file_metadata.setdefault("defense", result.defense)
    sha256 = save_safetensors(result.state_dict, out, metadata=file_metadata)
    return result.to_document(sha256)
