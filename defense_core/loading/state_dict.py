"""State dicts: safetensors and ``torch.save`` files, read without unpickling objects."""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from defense_core.errors import ModelLoadError, UnsafeModelError
from defense_core.loading.formats import (
    CODE_FORMATS,
    DEFAULT_MAX_MODEL_BYTES,
    INT_DTYPES,
    MAX_SAFETENSORS_HEADER_BYTES,
    MAX_TENSORS,
    SAFETENSORS,
    UNSAFE_HINT,
    check_declared_size,
    check_size,
    declare_arch_error,
    parse_json,
    sniff_model_format,
)

log = logging.getLogger(__name__)
_WRAPPER_KEYS = ("state_dict", "model")


def read_state_dict(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> dict[str, torch.Tensor]:
    """Read a state dict (safetensors or ``torch.save``) without unpickling objects.

    Values are CPU tensors (floating or integer). Archives that carry code
    (torch.export, TorchScript) are refused here: they are loaded whole by
    :func:`load_model`.
    """
    path = Path(path)
    check_size(path, max_bytes)
    fmt = sniff_model_format(path)
    if fmt in CODE_FORMATS:
        raise declare_arch_error(fmt)
    if fmt == SAFETENSORS:
        state = _read_safetensors(path)
    else:
        state = _read_torch_save(path, max_bytes=max_bytes)
    return _validate_tensors(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"safetensors header of {header_len} bytes does not fit the file")
        header = parse_json(fh.read(header_len), "safetensors header")
    if not isinstance(header, dict):
        raise ModelLoadError("safetensors header must be a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > MAX_TENSORS:
        raise ModelLoadError(f"the file holds {len(entries)} tensors (limit {MAX_TENSORS})")
    data_len = size - 8 - header_len
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ModelLoadError(f"safetensors entry {name!r} has invalid data offsets")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # safe_open is not a mapping: its names come from keys()
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # the library reports malformed files with its own error types
        raise ModelLoadError(f"cannot read the safetensors file: {exc}") from exc


def _read_torch_save(path: Path, *, max_bytes: int) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            check_declared_size(zf.infolist(), max_bytes)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        log.info("refused a model file that needs full unpickling: %s", str(exc).splitlines()[0])
        raise UnsafeModelError(f"the model file {UNSAFE_HINT}") from exc
    except Exception as exc:  # corrupt archives surface as RuntimeError, EOFError, ...
        raise ModelLoadError(f"cannot read the model file: {type(exc).__name__}: {exc}") from exc
    return _unwrap(obj)


def _unwrap(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"the file holds a {type(obj).__name__}, not a state dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = dict(obj)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _validate_tensors(state: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    if not state:
        raise ModelLoadError("the file holds no tensors")
    if len(state) > MAX_TENSORS:
        raise ModelLoadError(f"the file holds {len(state)} tensors (limit {MAX_TENSORS})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"state dict keys must be strings, found {key!r}")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{key!r} holds a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            raise ModelLoadError(f"{key!r} is not a dense CPU tensor")
        if not (value.is_floating_point() or value.dtype in INT_DTYPES):
            raise ModelLoadError(
                f"{key!r} has dtype {value.dtype}; expected floating point or integer"
            )
        out[key] = value
    return out
