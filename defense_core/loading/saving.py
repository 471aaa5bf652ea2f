"""Writing a state dict as safetensors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from defense_core.atomic import atomic_write
from defense_core.errors import InputError


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``state_dict`` as safetensors (atomically); return the file's sha256 hex."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError("safetensors metadata must map strings to strings")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        t = value.detach().to("cpu")
        # safetensors wants one contiguous, unshared buffer per tensor.
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not whole or t.untyped_storage().data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        digest = _sha256(tmp)
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
